// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// The boot facts a KMS asks a policy contract about (field order and types are dstack's `IAppAuth.AppBootInfo`,
/// so the ABI encoding — and the ERC-165 interface id 0x1e079198 — are compatible).
interface IAppAuth {
    struct AppBootInfo {
        address appId;
        bytes32 composeHash;
        address instanceId;
        bytes32 deviceId;
        bytes32 mrAggregated;
        bytes32 mrSystem;
        bytes32 osImageHash;
        string tcbStatus;
        string[] advisoryIds;
    }

    /// `(true, "")` when the CVM described by `bootInfo` may receive its keys, otherwise `(false, reason)`.
    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason);
}
