// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

// A minimal ENS, written for this project, with the read ABI of the real
// registry and public resolver (EIP-137, EIP-181): enough for the sandbox to
// give some accounts a primary name. No ownership of nodes: anyone may set
// anything, which is fine on a local chain only. The registry has no
// constructor or immutables, so the sandbox copies its runtime code to the
// registry's real address and fills it through its own setter.

contract EnsRegistry {
    mapping(bytes32 => address) private resolvers;

    function resolver(bytes32 node) external view returns (address) {
        return resolvers[node];
    }

    function setResolver(bytes32 node, address resolverAddress) external {
        resolvers[node] = resolverAddress;
    }
}

contract EnsResolver {
    mapping(bytes32 => string) private names;
    mapping(bytes32 => address) private addrs;

    /// The reverse record: the name of `<address>.addr.reverse`.
    function name(bytes32 node) external view returns (string memory) {
        return names[node];
    }

    /// The forward record: the address of a name.
    function addr(bytes32 node) external view returns (address) {
        return addrs[node];
    }

    function setName(bytes32 node, string calldata newName) external {
        names[node] = newName;
    }

    function setAddr(bytes32 node, address newAddr) external {
        addrs[node] = newAddr;
    }
}
