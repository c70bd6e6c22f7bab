// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

// A minimal contract with Multicall3's `aggregate3` ABI, written for this
// project. Anvil does not ship Multicall3, so the sandbox installs this
// runtime code at the canonical address 0xcA11bde05977b3631167028862bE2a173976CA11
// for clients that batch their reads through it.
contract Multicall3 {
    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    /// Runs every call in order and returns each outcome. A failing call
    /// reverts the whole batch unless it was marked `allowFailure`, with the
    /// same reason string as the canonical contract.
    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            Call3 calldata call = calls[i];
            (bool success, bytes memory ret) = call.target.call(call.callData);
            require(success || call.allowFailure, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }

    /// The hash of one of the 256 blocks below the current one (0 otherwise),
    /// as the canonical contract answers.
    function getBlockHash(uint256 blockNumber) external view returns (bytes32 blockHash) {
        blockHash = blockhash(blockNumber);
    }

    /// The number of the block the call runs in, as the canonical contract answers.
    function getBlockNumber() external view returns (uint256 blockNumber) {
        blockNumber = block.number;
    }
}
