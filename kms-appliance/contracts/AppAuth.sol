// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import "./IAppAuth.sol";
import "./Owned.sol";

/// Per-app policy: which compose hashes and devices an app may boot with. The contract's address is the app id.
/// Same checks and reason strings as dstack's DstackApp; not upgradeable (deploy a new one and re-register).
/// Ours in addition: the owner can revoke single instances ("Instance revoked").
contract AppAuth is IAppAuth, Owned {
    mapping(bytes32 => bool) public allowedComposeHashes;
    mapping(bytes32 => bool) public allowedDeviceIds;
    mapping(address => bool) public revokedInstances;
    bool public allowAnyDevice;
    bool public requireTcbUpToDate;

    event ComposeHashAdded(bytes32 composeHash);
    event ComposeHashRemoved(bytes32 composeHash);
    event DeviceAdded(bytes32 deviceId);
    event DeviceRemoved(bytes32 deviceId);
    event AllowAnyDeviceSet(bool allowAny);
    event RequireTcbUpToDateSet(bool required);
    event InstanceRevoked(address instanceId);
    event InstanceRestored(address instanceId);

    /// Zero `initialDeviceId` / `initialComposeHash` mean "none".
    constructor(
        address initialOwner,
        bool allowAnyDevice_,
        bool requireTcbUpToDate_,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) Owned(initialOwner) {
        allowAnyDevice = allowAnyDevice_;
        requireTcbUpToDate = requireTcbUpToDate_;
        if (initialDeviceId != bytes32(0)) {
            allowedDeviceIds[initialDeviceId] = true;
            emit DeviceAdded(initialDeviceId);
        }
        if (initialComposeHash != bytes32(0)) {
            allowedComposeHashes[initialComposeHash] = true;
            emit ComposeHashAdded(initialComposeHash);
        }
    }

    function version() external pure returns (uint256) {
        return 1;
    }

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

    function revokeInstance(address instanceId) external onlyOwner {
        revokedInstances[instanceId] = true;
        emit InstanceRevoked(instanceId);
    }

    function restoreInstance(address instanceId) external onlyOwner {
        revokedInstances[instanceId] = false;
        emit InstanceRestored(instanceId);
    }

    function setRequireTcbUpToDate(bool required) external onlyOwner {
        requireTcbUpToDate = required;
        emit RequireTcbUpToDateSet(required);
    }

    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        override
        returns (bool isAllowed, string memory reason)
    {
        if (requireTcbUpToDate && keccak256(bytes(bootInfo.tcbStatus)) != keccak256("UpToDate")) {
            return (false, "TCB status is not up to date");
        }
        if (!allowedComposeHashes[bootInfo.composeHash]) {
            return (false, "Compose hash not allowed");
        }
        if (!allowAnyDevice && !allowedDeviceIds[bootInfo.deviceId]) {
            return (false, "Device not allowed");
        }
        if (revokedInstances[bootInfo.instanceId]) {
            return (false, "Instance revoked");
        }
        return (true, "");
    }

    /// ERC-165: IAppAuth (0x1e079198) and ERC-165 itself.
    function supportsInterface(bytes4 interfaceId) external pure returns (bool) {
        return interfaceId == type(IAppAuth).interfaceId || interfaceId == 0x01ffc9a7;
    }
}
