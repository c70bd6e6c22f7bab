// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

// A test stand-in written for this project: a DstackApp whose allowlists can
// no longer change. It has the view surface the bridge reads (one-step
// ownership, so no `pendingOwner()`), but `addComposeHash` and `addDevice`
// revert with a reason string even for the owner, so a Safe-owned app gives
// the bridge's simulation a revert to report.
contract FrozenDstackApp {
    address public owner;
    bool public allowAnyDevice;
    mapping(bytes32 => bool) public allowedComposeHashes;
    mapping(bytes32 => bool) public allowedDeviceIds;

    constructor(address initialOwner) {
        owner = initialOwner;
    }

    function addComposeHash(bytes32) external pure {
        revert("FrozenDstackApp: the allowlist is frozen");
    }

    function addDevice(bytes32) external pure {
        revert("FrozenDstackApp: the allowlist is frozen");
    }
}
