//! The on-chain policy: our `KmsRegistry` and per-app `AppAuth` contracts (`kms-appliance/contracts/`), asked
//! with `eth_call` of `isAppAllowed(AppBootInfo)` / `isKmsAllowed(AppBootInfo)` and `gatewayAppId()`, plus the
//! admin operations (deploy, register apps, edit allow-lists) the `dstack-kms admin` CLI runs.
//!
//! The compiled contracts (ABI + bytecode, solc-js 0.8.28) are committed in `contracts/artifacts/` so the build
//! needs no node; `tests/contracts.rs` recompiles and compares.

use std::time::Duration;

use alloy_primitives::{Address, B256, FixedBytes};
use alloy_sol_types::{SolCall, SolValue, sol};

use crate::chain::{ChainError, EthRpc, Wallet};
use crate::policy::{BootInfo, BootResponse};

sol! {
    /// dstack's `IAppAuth.AppBootInfo` (same field order and types).
    #[derive(Debug, PartialEq, Eq)]
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

    interface IKmsRegistry {
        function isAppAllowed(AppBootInfo bootInfo) external view returns (bool isAllowed, string reason);
        function isKmsAllowed(AppBootInfo bootInfo) external view returns (bool isAllowed, string reason);
        function gatewayAppId() external view returns (string);
        function setGatewayAppId(string appId) external;
        function registerApp(address appId) external;
        function deregisterApp(address appId) external;
        function addOsImageHash(bytes32 osImageHash) external;
        function removeOsImageHash(bytes32 osImageHash) external;
        function addKmsAggregatedMr(bytes32 mrAggregated) external;
        function removeKmsAggregatedMr(bytes32 mrAggregated) external;
        function addKmsDevice(bytes32 deviceId) external;
        function removeKmsDevice(bytes32 deviceId) external;
    }

    interface IAppAuthAdmin {
        function addComposeHash(bytes32 composeHash) external;
        function removeComposeHash(bytes32 composeHash) external;
        function addDevice(bytes32 deviceId) external;
        function removeDevice(bytes32 deviceId) external;
        function setAllowAnyDevice(bool allowAny) external;
        function setRequireTcbUpToDate(bool required) external;
        function revokeInstance(address instanceId) external;
        function restoreInstance(address instanceId) external;
    }
}

/// The committed compiled contracts.
pub const KMS_REGISTRY_ARTIFACT: &str = include_str!("../contracts/artifacts/KmsRegistry.json");
pub const APP_AUTH_ARTIFACT: &str = include_str!("../contracts/artifacts/AppAuth.json");

/// Creation bytecode from an artifact (`{"bytecode": "0x…"}`).
pub fn artifact_bytecode(artifact: &str) -> Result<Vec<u8>, ChainError> {
    let v: serde_json::Value = serde_json::from_str(artifact).map_err(|e| ChainError::Abi(e.to_string()))?;
    let code = v["bytecode"]
        .as_str()
        .ok_or_else(|| ChainError::Abi("artifact has no bytecode".into()))?;
    hex::decode(code.strip_prefix("0x").unwrap_or(code)).map_err(|e| ChainError::Abi(format!("bytecode: {e}")))
}

/// Left-pads `bytes` to N bytes (dstack's auth-eth does the same with hex strings); longer input is an error.
fn padded<const N: usize>(field: &str, bytes: &[u8]) -> Result<FixedBytes<N>, ChainError> {
    let mut out = [0u8; N];
    let start = N
        .checked_sub(bytes.len())
        .ok_or_else(|| ChainError::Invalid(format!("{field} is {} bytes, at most {N} allowed", bytes.len())))?;
    out[start..].copy_from_slice(bytes);
    Ok(FixedBytes(out))
}

impl TryFrom<&BootInfo> for AppBootInfo {
    type Error = ChainError;

    fn try_from(b: &BootInfo) -> Result<Self, ChainError> {
        Ok(Self {
            appId: Address(padded("appId", &b.app_id)?),
            composeHash: padded("composeHash", &b.compose_hash)?,
            instanceId: Address(padded("instanceId", &b.instance_id)?),
            deviceId: padded("deviceId", &b.device_id)?,
            mrAggregated: padded("mrAggregated", &b.mr_aggregated)?,
            mrSystem: padded("mrSystem", &b.mr_system)?,
            osImageHash: padded("osImageHash", &b.os_image_hash)?,
            tcbStatus: b.tcb_status.clone(),
            advisoryIds: b.advisory_ids.clone(),
        })
    }
}

/// A `KmsRegistry` reached over JSON-RPC.
#[derive(Debug)]
pub struct OnchainPolicy {
    rpc: EthRpc,
    kms_contract: Address,
}

impl OnchainPolicy {
    pub fn new(rpc_url: &str, kms_contract: &str, timeout: Duration) -> Result<Self, ChainError> {
        let kms_contract = kms_contract
            .parse()
            .map_err(|e| ChainError::Invalid(format!("kms_contract {kms_contract:?}: {e}")))?;
        Ok(Self {
            rpc: EthRpc::new(rpc_url, timeout)?,
            kms_contract,
        })
    }

    pub fn kms_contract(&self) -> Address {
        self.kms_contract
    }

    pub fn rpc_url(&self) -> &str {
        self.rpc.url()
    }

    async fn view<C: SolCall>(&self, call: &C) -> Result<C::Return, ChainError> {
        let out = self.rpc.call(self.kms_contract, &call.abi_encode()).await?;
        if out.is_empty() {
            return Err(ChainError::Abi(format!(
                "{} returned nothing: is {} a KmsRegistry?",
                C::SIGNATURE,
                self.kms_contract
            )));
        }
        C::abi_decode_returns(&out).map_err(|e| ChainError::Abi(format!("{}: {e}", C::SIGNATURE)))
    }

    /// `isAppAllowed` (or `isKmsAllowed`), then `gatewayAppId()` when allowed.
    pub async fn is_allowed(&self, info: &BootInfo, is_kms: bool) -> Result<BootResponse, ChainError> {
        let boot_info = AppBootInfo::try_from(info)?;
        let r = if is_kms {
            let r = self
                .view(&IKmsRegistry::isKmsAllowedCall { bootInfo: boot_info })
                .await?;
            (r.isAllowed, r.reason)
        } else {
            let r = self
                .view(&IKmsRegistry::isAppAllowedCall { bootInfo: boot_info })
                .await?;
            (r.isAllowed, r.reason)
        };
        let gateway_app_id = if r.0 {
            self.gateway_app_id().await?
        } else {
            String::new()
        };
        Ok(BootResponse {
            is_allowed: r.0,
            reason: r.1,
            gateway_app_id,
        })
    }

    pub async fn chain_id(&self) -> Result<u64, ChainError> {
        self.rpc.chain_id().await
    }

    pub async fn gateway_app_id(&self) -> Result<String, ChainError> {
        self.view(&IKmsRegistry::gatewayAppIdCall {}).await
    }
}

/// An owner-side change to the registry or to an app's contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    SetGatewayAppId(String),
    RegisterApp(Address),
    DeregisterApp(Address),
    AddOsImage(B256),
    RemoveOsImage(B256),
    AddKmsMr(B256),
    RemoveKmsMr(B256),
    AddKmsDevice(B256),
    RemoveKmsDevice(B256),
    AddComposeHash { app: Address, hash: B256 },
    RemoveComposeHash { app: Address, hash: B256 },
    AddDevice { app: Address, device: B256 },
    RemoveDevice { app: Address, device: B256 },
    SetAllowAnyDevice { app: Address, allow: bool },
    SetRequireTcbUpToDate { app: Address, require: bool },
    RevokeInstance { app: Address, instance: Address },
    RestoreInstance { app: Address, instance: Address },
}

impl Change {
    /// The contract to call (`registry` or the app's) and the calldata.
    pub fn call(&self, registry: Address) -> (Address, Vec<u8>) {
        use IAppAuthAdmin as A;
        use IKmsRegistry as K;
        match self.clone() {
            Self::SetGatewayAppId(id) => (registry, K::setGatewayAppIdCall { appId: id }.abi_encode()),
            Self::RegisterApp(a) => (registry, K::registerAppCall { appId: a }.abi_encode()),
            Self::DeregisterApp(a) => (registry, K::deregisterAppCall { appId: a }.abi_encode()),
            Self::AddOsImage(h) => (registry, K::addOsImageHashCall { osImageHash: h }.abi_encode()),
            Self::RemoveOsImage(h) => (registry, K::removeOsImageHashCall { osImageHash: h }.abi_encode()),
            Self::AddKmsMr(m) => (registry, K::addKmsAggregatedMrCall { mrAggregated: m }.abi_encode()),
            Self::RemoveKmsMr(m) => (registry, K::removeKmsAggregatedMrCall { mrAggregated: m }.abi_encode()),
            Self::AddKmsDevice(d) => (registry, K::addKmsDeviceCall { deviceId: d }.abi_encode()),
            Self::RemoveKmsDevice(d) => (registry, K::removeKmsDeviceCall { deviceId: d }.abi_encode()),
            Self::AddComposeHash { app, hash } => (app, A::addComposeHashCall { composeHash: hash }.abi_encode()),
            Self::RemoveComposeHash { app, hash } => (app, A::removeComposeHashCall { composeHash: hash }.abi_encode()),
            Self::AddDevice { app, device } => (app, A::addDeviceCall { deviceId: device }.abi_encode()),
            Self::RemoveDevice { app, device } => (app, A::removeDeviceCall { deviceId: device }.abi_encode()),
            Self::SetAllowAnyDevice { app, allow } => (app, A::setAllowAnyDeviceCall { allowAny: allow }.abi_encode()),
            Self::SetRequireTcbUpToDate { app, require } => {
                (app, A::setRequireTcbUpToDateCall { required: require }.abi_encode())
            }
            Self::RevokeInstance { app, instance } => {
                (app, A::revokeInstanceCall { instanceId: instance }.abi_encode())
            }
            Self::RestoreInstance { app, instance } => {
                (app, A::restoreInstanceCall { instanceId: instance }.abi_encode())
            }
        }
    }
}

/// Initial settings of a new app's `AppAuth` (zero device / compose hash: none).
#[derive(Debug, Clone, Default)]
pub struct NewApp {
    pub owner: Option<Address>,
    pub allow_any_device: bool,
    pub require_tcb_up_to_date: bool,
    pub device_id: B256,
    pub compose_hash: B256,
}

/// The owner's side: deploys contracts and sends changes, signing with `wallet`.
#[derive(Debug)]
pub struct Admin {
    pub rpc: EthRpc,
    pub wallet: Wallet,
}

impl Admin {
    async fn deploy(&self, artifact: &str, ctor_args: Vec<u8>) -> Result<Address, ChainError> {
        let mut code = artifact_bytecode(artifact)?;
        code.extend_from_slice(&ctor_args);
        let receipt = self.rpc.transact(&self.wallet, None, &code).await?;
        receipt
            .contract_address
            .ok_or_else(|| ChainError::Invalid(format!("{} created no contract", receipt.transaction_hash)))
    }

    /// Deploys a `KmsRegistry` owned by `owner` (default: the signer).
    pub async fn deploy_registry(&self, owner: Option<Address>) -> Result<Address, ChainError> {
        let owner = owner.unwrap_or(self.wallet.address());
        self.deploy(KMS_REGISTRY_ARTIFACT, (owner,).abi_encode_params()).await
    }

    /// Deploys an app's `AppAuth` and registers it in `registry`; returns the app id (= its address).
    pub async fn register_new_app(&self, registry: Address, app: &NewApp) -> Result<Address, ChainError> {
        let owner = app.owner.unwrap_or(self.wallet.address());
        let args = (
            owner,
            app.allow_any_device,
            app.require_tcb_up_to_date,
            app.device_id,
            app.compose_hash,
        )
            .abi_encode_params();
        let app_id = self.deploy(APP_AUTH_ARTIFACT, args).await?;
        self.apply(registry, &Change::RegisterApp(app_id)).await?;
        Ok(app_id)
    }

    /// Sends one change; fails if the contract refuses it (not the owner, ...).
    pub async fn apply(&self, registry: Address, change: &Change) -> Result<B256, ChainError> {
        let (to, data) = change.call(registry);
        Ok(self.rpc.transact(&self.wallet, Some(to), &data).await?.transaction_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_auth_interface_id_matches_dstack() {
        // ERC-165 id of an interface with one function = that function's selector; dstack documents 0x1e079198.
        assert_eq!(IKmsRegistry::isAppAllowedCall::SELECTOR, [0x1e, 0x07, 0x91, 0x98]);
        assert_eq!(
            IKmsRegistry::isAppAllowedCall::SIGNATURE,
            "isAppAllowed((address,bytes32,address,bytes32,bytes32,bytes32,bytes32,string,string[]))"
        );
    }

    #[test]
    fn boot_info_is_left_padded_and_overlong_fields_refused() {
        let mut info = BootInfo {
            tee_variant: "dstack-tdx".into(),
            mr_aggregated: vec![0xaa; 32],
            os_image_hash: vec![],
            mr_system: vec![1],
            app_id: vec![0x11; 20],
            compose_hash: vec![0xc0; 32],
            instance_id: vec![],
            device_id: vec![0xde; 32],
            key_provider_info: vec![],
            tcb_status: "UpToDate".into(),
            advisory_ids: vec!["INTEL-SA-00001".into()],
        };
        let b = AppBootInfo::try_from(&info).unwrap();
        assert_eq!(b.appId, Address::repeat_byte(0x11));
        assert_eq!(b.instanceId, Address::ZERO);
        assert_eq!(b.osImageHash, B256::ZERO);
        assert_eq!(b.mrSystem.as_slice()[31], 1);
        assert_eq!(b.mrSystem.as_slice()[..31], [0; 31]);
        assert_eq!(b.advisoryIds, vec!["INTEL-SA-00001".to_string()]);
        info.app_id = vec![0x11; 21];
        let err = AppBootInfo::try_from(&info).unwrap_err();
        assert!(err.to_string().contains("appId is 21 bytes"), "{err}");
    }

    #[test]
    fn committed_artifacts_have_bytecode() {
        for a in [KMS_REGISTRY_ARTIFACT, APP_AUTH_ARTIFACT] {
            let code = artifact_bytecode(a).unwrap();
            // Solidity creation code starts with the free-memory-pointer setup PUSH1 0x80 PUSH1 0x40 MSTORE.
            assert_eq!(code.get(..5), Some(&[0x60, 0x80, 0x60, 0x40, 0x52][..]));
        }
    }

    #[test]
    fn changes_target_the_right_contract() {
        let registry = Address::repeat_byte(1);
        let app = Address::repeat_byte(2);
        let (to, data) = Change::AddOsImage(B256::repeat_byte(3)).call(registry);
        assert_eq!(to, registry);
        assert_eq!(data.get(..4), Some(&IKmsRegistry::addOsImageHashCall::SELECTOR[..]));
        let (to, _) = Change::AddComposeHash { app, hash: B256::ZERO }.call(registry);
        assert_eq!(to, app);
    }
}
