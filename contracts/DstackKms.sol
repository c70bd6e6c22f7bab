// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

// A test stand-in for Phala's DstackKms, written for this project.
//
// The bridge reads one thing from the real contract: `kmsInfo()`, whose
// `k256Pubkey` is the KMS root key that signs every app's env encryption key
// (dstack-app.md §2.1). This stand-in keeps that getter with the real
// struct's field order, so its ABI matches, plus the app registry the KMS
// consults. It has no proxy, no measurements and no app factory.
contract DstackKms {
    struct KmsInfo {
        bytes k256Pubkey;
        bytes caPubkey;
        bytes quote;
        bytes eventlog;
    }

    error NotOwner(address caller);

    event KmsInfoSet(bytes k256Pubkey);
    event AppRegistered(address appId);

    address public owner;
    KmsInfo public kmsInfo;
    mapping(address => bool) public registeredApps;

    constructor(address initialOwner, bytes memory k256Pubkey) {
        owner = initialOwner;
        kmsInfo.k256Pubkey = k256Pubkey;
        emit KmsInfoSet(k256Pubkey);
    }

    /// Replaces the root keys, as Phala does when it rotates them.
    function setKmsInfo(KmsInfo memory info) external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        kmsInfo = info;
        emit KmsInfoSet(info.k256Pubkey);
    }

    /// Permissionless, like the real one: registration grants nothing.
    function registerApp(address appId) external {
        registeredApps[appId] = true;
        emit AppRegistered(appId);
    }
}
