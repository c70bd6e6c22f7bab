// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

// Stand-ins written for this project, which the chain follower's failure
// tests put at a Safe's or an app's address with `anvil_setCode` for a
// moment, so the local chain shows what a real one can: an ExecutionFailure,
// a log of an odd shape, a Safe that reports another version, an app whose
// writes revert. None has a constructor or immutables, so the runtime code
// is all there is to copy.

/// Emits what a Safe emits, from whatever address it runs at.
contract EventEmitter {
    event ExecutionFailure(bytes32 indexed txHash, uint256 payment);

    /// What Safe 1.4.1 emits when the inner call fails with safeTxGas > 0.
    function executionFailure(bytes32 txHash, uint256 payment) external {
        emit ExecutionFailure(txHash, payment);
    }

    /// A log with `topic0` alone and no data: a shape no Safe version emits.
    function bareLog(bytes32 topic0) external {
        assembly {
            log1(0, 0, topic0)
        }
    }
}

/// A Safe proxy whose VERSION() says 1.3.0. Everything else goes to the
/// singleton in slot 0, as SafeProxy does, so the Safe keeps working.
contract SafeProxyWithOtherVersion {
    address internal singleton;

    function VERSION() external pure returns (string memory) {
        return "1.3.0";
    }

    fallback() external payable {
        address target = singleton;
        assembly {
            calldatacopy(0, 0, calldatasize())
            let ok := delegatecall(gas(), target, 0, calldatasize(), 0, 0)
            returndatacopy(0, 0, returndatasize())
            if iszero(ok) {
                revert(0, returndatasize())
            }
            return(0, returndatasize())
        }
    }

    receive() external payable {}
}

/// A DstackApp (one-step ownership) whose allowlists cannot change: reads
/// answer from the same storage slots as DstackApp's, so it can replace one
/// in place, but addComposeHash and addDevice revert even for the owner.
contract DstackAppRefusingWrites {
    address public owner;
    mapping(bytes32 => bool) public allowedComposeHashes;
    mapping(bytes32 => bool) public allowedDeviceIds;
    bool public allowAnyDevice;

    function addComposeHash(bytes32) external pure {
        revert("DstackAppRefusingWrites: no writes");
    }

    function addDevice(bytes32) external pure {
        revert("DstackAppRefusingWrites: no writes");
    }
}
