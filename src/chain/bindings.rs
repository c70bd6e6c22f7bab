//! ABI of the contracts the bridge reads besides the Safe (see dstack-app.md).

alloy::sol! {
    /// The DstackApp surface the bridge uses. `pendingOwner()` exists only on
    /// apps with two-step ownership.
    #[sol(rpc)]
    interface IDstackApp {
        function owner() external view returns (address);
        function pendingOwner() external view returns (address);
        function allowAnyDevice() external view returns (bool);
        function allowedComposeHashes(bytes32 composeHash) external view returns (bool);
        function allowedDeviceIds(bytes32 deviceId) external view returns (bool);
        function addComposeHash(bytes32 composeHash) external;
        function addDevice(bytes32 deviceId) external;

        event ComposeHashAdded(bytes32 composeHash);
        event DeviceAdded(bytes32 deviceId);

        error OwnableUnauthorizedAccount(address account);
        error OwnableInvalidOwner(address owner);
    }

    /// EIP-1271: a contract account says whether it accepts a signature of a
    /// hash. A Safe answers through its CompatibilityFallbackHandler (Safe
    /// 1.3.0 and later), which checks its owners' signatures of the Safe's
    /// own `SafeMessage` hash of `hash`.
    #[sol(rpc)]
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4 magicValue);
    }

    /// Multicall3's `aggregate3`: many calls, one `eth_call`.
    #[sol(rpc)]
    interface IMulticall3 {
        struct Call3 {
            address target;
            bool allowFailure;
            bytes callData;
        }
        struct Result {
            bool success;
            bytes returnData;
        }
        function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData);
        function getBlockHash(uint256 blockNumber) external view returns (bytes32 blockHash);
        function getBlockNumber() external view returns (uint256 blockNumber);
    }
}
