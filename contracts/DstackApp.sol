// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

// Test stand-ins for Phala's DstackApp, written for this project.
//
// They reproduce the external surface the approval bridge touches (function
// selectors, event topics, the OpenZeppelin-style owner errors) without the
// proxy, the KMS hooks or the upgrade machinery of the real contract:
//
// - `DstackApp` has one-step ownership like the <= 2026-02 implementations.
//   It has no `pendingOwner()` at all, so calling it reverts with empty data,
//   which is how the service tells the two ownership models apart.
// - `DstackApp2Step` has two-step ownership like the 2026-05+ implementations:
//   `transferOwnership` only stages a pending owner, who must `acceptOwnership`.

/// One-step ownership with the OpenZeppelin v5 names, so revert data and
/// event topics match what the real contract produces.
abstract contract OneStepOwnable {
    error OwnableUnauthorizedAccount(address account);
    error OwnableInvalidOwner(address owner);

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    address private _owner;

    constructor(address initialOwner) {
        if (initialOwner == address(0)) revert OwnableInvalidOwner(address(0));
        _setOwner(initialOwner);
    }

    modifier onlyOwner() {
        if (msg.sender != _owner) revert OwnableUnauthorizedAccount(msg.sender);
        _;
    }

    function owner() public view returns (address) {
        return _owner;
    }

    function transferOwnership(address newOwner) public virtual onlyOwner {
        if (newOwner == address(0)) revert OwnableInvalidOwner(address(0));
        _setOwner(newOwner);
    }

    // Kept because the real contract inherits it: a batch that calls it by
    // mistake freezes the app, and tests may want to show that.
    function renounceOwnership() public virtual onlyOwner {
        _setOwner(address(0));
    }

    function _setOwner(address newOwner) internal virtual {
        address previous = _owner;
        _owner = newOwner;
        emit OwnershipTransferred(previous, newOwner);
    }
}

/// The allowlists an app owner manages. Writes are idempotent on purpose:
/// the real contract emits the event again instead of reverting when a value
/// is already set, and removing a missing value is not an error either.
contract DstackApp is OneStepOwnable {
    event ComposeHashAdded(bytes32 composeHash);
    event ComposeHashRemoved(bytes32 composeHash);
    event DeviceAdded(bytes32 deviceId);
    event DeviceRemoved(bytes32 deviceId);
    event AllowAnyDeviceSet(bool allowAny);

    mapping(bytes32 => bool) public allowedComposeHashes;
    mapping(bytes32 => bool) public allowedDeviceIds;
    bool public allowAnyDevice;

    constructor(address initialOwner) OneStepOwnable(initialOwner) {}

    function addComposeHash(bytes32 composeHash) external onlyOwner {
        allowedComposeHashes[composeHash] = true;
        emit ComposeHashAdded(composeHash);
    }

    function removeComposeHash(bytes32 composeHash) external onlyOwner {
        allowedComposeHashes[composeHash] = false;
        emit ComposeHashRemoved(composeHash);
    }

    function addDevice(bytes32 deviceId) external onlyOwner {
        allowedDeviceIds[deviceId] = true;
        emit DeviceAdded(deviceId);
    }

    function removeDevice(bytes32 deviceId) external onlyOwner {
        allowedDeviceIds[deviceId] = false;
        emit DeviceRemoved(deviceId);
    }

    function setAllowAnyDevice(bool allowAny) external onlyOwner {
        allowAnyDevice = allowAny;
        emit AllowAnyDeviceSet(allowAny);
    }
}

/// Two-step ownership (OpenZeppelin `Ownable2Step` semantics): the current
/// owner names a pending owner, and ownership moves only when that account
/// calls `acceptOwnership()`. Until then `owner()` is unchanged.
contract DstackApp2Step is DstackApp {
    event OwnershipTransferStarted(address indexed previousOwner, address indexed newOwner);

    address private _pendingOwner;

    constructor(address initialOwner) DstackApp(initialOwner) {}

    function pendingOwner() public view returns (address) {
        return _pendingOwner;
    }

    // Staging the zero address is allowed: it cancels a pending transfer.
    function transferOwnership(address newOwner) public override onlyOwner {
        _pendingOwner = newOwner;
        emit OwnershipTransferStarted(owner(), newOwner);
    }

    function acceptOwnership() public {
        if (msg.sender != _pendingOwner) revert OwnableUnauthorizedAccount(msg.sender);
        _setOwner(msg.sender);
    }

    // Any change of owner (accept or renounce) clears a staged transfer.
    function _setOwner(address newOwner) internal override {
        delete _pendingOwner;
        super._setOwner(newOwner);
    }
}
