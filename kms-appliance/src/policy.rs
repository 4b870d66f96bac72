//! Authorization: `BootInfo` (dstack's `PolicyBootInfo` JSON) and the `dev` / `webhook` / `onchain` policies
//! (`onchain`: see [`crate::onchain`]).
//!
//! `BootInfo` is camelCase JSON with byte fields as lowercase hex (dstack's `serde_human_bytes`):
//! `teeVariant, mrAggregated, osImageHash, mrSystem, appId, composeHash, instanceId, deviceId,
//! keyProviderInfo, tcbStatus, advisoryIds`. `teeVariant` is `dstack-tdx` for verified TDX quotes and
//! (ours) `dstack-simulated-tdx` for simulated ones, whose `tcbStatus` is `Simulated`: a policy never sees a
//! simulated CVM under a real variant.
//!
//! Webhook (dstack-compatible): `POST {url}/bootAuth/app` (or `/bootAuth/kms` for a KMS asking for the root
//! keys) with the BootInfo JSON; the answer is `{"isAllowed": bool, "reason": str, "gatewayAppId": str}`. Any
//! failure — connection, timeout, non-2xx status, malformed JSON — is a denial.

use std::time::Duration;

use bytes::Bytes;
use dstack_ra_tls::AttestedIdentity;
use serde::{Deserialize, Serialize};

use crate::config::{AuthApiConfig, AuthApiKind};
use crate::onchain::OnchainPolicy;

/// Why a policy could not be asked (every one of these denies).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("webhook URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("webhook request failed: {0}")]
    Request(String),
    #[error("webhook answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("webhook answer is not a BootResponse: {0}")]
    Answer(String),
    #[error("on-chain policy: {0}")]
    Chain(#[from] crate::chain::ChainError),
}

mod hexstr {
    use serde::Serializer;
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
}

/// The authorization input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootInfo {
    pub tee_variant: String,
    #[serde(with = "hexstr")]
    pub mr_aggregated: Vec<u8>,
    #[serde(with = "hexstr")]
    pub os_image_hash: Vec<u8>,
    #[serde(with = "hexstr")]
    pub mr_system: Vec<u8>,
    #[serde(with = "hexstr")]
    pub app_id: Vec<u8>,
    #[serde(with = "hexstr")]
    pub compose_hash: Vec<u8>,
    #[serde(with = "hexstr")]
    pub instance_id: Vec<u8>,
    #[serde(with = "hexstr")]
    pub device_id: Vec<u8>,
    #[serde(with = "hexstr")]
    pub key_provider_info: Vec<u8>,
    pub tcb_status: String,
    pub advisory_ids: Vec<String>,
}

impl BootInfo {
    /// From a verified RA-TLS identity; `os_image_hash` comes from the caller's vm_config when it has one.
    pub fn from_identity(id: &AttestedIdentity, os_image_hash: Option<Vec<u8>>) -> Self {
        Self {
            tee_variant: if id.simulated {
                "dstack-simulated-tdx".into()
            } else {
                "dstack-tdx".into()
            },
            mr_aggregated: id.mr_aggregated.clone(),
            os_image_hash: os_image_hash.unwrap_or_else(|| id.os_image_hash.clone()),
            mr_system: id.mr_system.clone(),
            app_id: id.app_id.clone(),
            compose_hash: id.compose_hash.clone(),
            instance_id: id.instance_id.clone(),
            device_id: id.device_id.clone(),
            key_provider_info: id.key_provider_info.as_bytes().to_vec(),
            tcb_status: id.tcb_status.as_str().to_owned(),
            advisory_ids: id.advisory_ids.clone(),
        }
    }
}

/// A policy's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootResponse {
    pub is_allowed: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub gateway_app_id: String,
}

/// The configured authorization API.
#[derive(Debug, Clone)]
pub enum AuthApi {
    /// Allows everything (development only).
    Dev { gateway_app_id: String },
    /// Asks an HTTP service.
    Webhook {
        client: Box<dstack_rpc::Client>,
        base_path: String,
        url: String,
    },
    /// Asks our `KmsRegistry` contract with `eth_call`.
    Onchain(std::sync::Arc<OnchainPolicy>),
}

impl AuthApi {
    pub fn from_config(cfg: &AuthApiConfig) -> Result<Self, PolicyError> {
        match cfg.kind {
            AuthApiKind::Dev => Ok(Self::Dev {
                gateway_app_id: cfg.dev.gateway_app_id.clone(),
            }),
            AuthApiKind::Webhook => Self::webhook(&cfg.webhook.url, Duration::from_millis(cfg.webhook.timeout_ms)),
            AuthApiKind::Onchain => Ok(Self::Onchain(std::sync::Arc::new(OnchainPolicy::new(
                &cfg.onchain.rpc_url,
                &cfg.onchain.kms_contract,
                Duration::from_millis(cfg.onchain.timeout_ms),
            )?))),
        }
    }

    /// A webhook policy at `url` (`http://host:port[/base]`).
    pub fn webhook(url: &str, timeout: Duration) -> Result<Self, PolicyError> {
        let bad = |reason: String| PolicyError::Url {
            url: url.to_owned(),
            reason,
        };
        if !url.starts_with("http://") {
            return Err(bad("only http:// webhooks are supported".into()));
        }
        let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
        let client = dstack_rpc::Client::new(url)
            .map_err(|e| bad(e.to_string()))?
            .with_timeout(timeout)
            .with_connect_timeout(timeout);
        Ok(Self::Webhook {
            client: Box::new(client),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            url: url.to_owned(),
        })
    }

    pub fn is_dev(&self) -> bool {
        matches!(self, Self::Dev { .. })
    }

    /// The gateway app id a `dev` policy hands out (webhooks return it per request).
    pub fn static_gateway_app_id(&self) -> Option<&str> {
        match self {
            Self::Dev { gateway_app_id } => Some(gateway_app_id),
            Self::Webhook { .. } | Self::Onchain(_) => None,
        }
    }

    /// For `GetMeta` with the on-chain policy: the registry address and the chain id (`None` when unreachable).
    pub async fn chain_meta(&self) -> (Option<String>, Option<u64>) {
        match self {
            Self::Onchain(p) => (Some(p.kms_contract().to_string()), p.chain_id().await.ok()),
            Self::Dev { .. } | Self::Webhook { .. } => (None, None),
        }
    }

    /// Asks whether `info` may receive app keys (`is_kms = false`) or the KMS root keys (`is_kms = true`).
    pub async fn is_allowed(&self, info: &BootInfo, is_kms: bool) -> Result<BootResponse, PolicyError> {
        match self {
            Self::Dev { gateway_app_id } => Ok(BootResponse {
                is_allowed: true,
                reason: "dev policy allows everything".into(),
                gateway_app_id: gateway_app_id.clone(),
            }),
            Self::Webhook { client, base_path, .. } => {
                let path = format!("{base_path}/bootAuth/{}", if is_kms { "kms" } else { "app" });
                let body = serde_json::to_vec(info).map_err(|e| PolicyError::Request(e.to_string()))?;
                let resp = client
                    .send(http::Method::POST, &path, Some("application/json"), Bytes::from(body))
                    .await
                    .map_err(|e| PolicyError::Request(e.to_string()))?;
                if !resp.status.is_success() {
                    let body = String::from_utf8_lossy(&resp.body[..resp.body.len().min(256)]).into_owned();
                    return Err(PolicyError::Status {
                        status: resp.status.as_u16(),
                        body,
                    });
                }
                serde_json::from_slice(&resp.body).map_err(|e| PolicyError::Answer(e.to_string()))
            }
            Self::Onchain(policy) => Ok(policy.is_allowed(info, is_kms).await?),
        }
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Dev { .. } => "dev (allow all)".into(),
            Self::Webhook { url, .. } => format!("webhook {url}"),
            Self::Onchain(p) => format!("onchain {} at {}", p.kms_contract(), p.rpc_url()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_json_uses_dstack_names_and_hex() {
        let info = BootInfo {
            tee_variant: "dstack-tdx".into(),
            mr_aggregated: vec![0xab],
            os_image_hash: vec![],
            mr_system: vec![1, 2],
            app_id: vec![0xff; 2],
            compose_hash: vec![0x0c],
            instance_id: vec![],
            device_id: vec![],
            key_provider_info: b"{}".to_vec(),
            tcb_status: "UpToDate".into(),
            advisory_ids: vec!["INTEL-SA-1".into()],
        };
        let v: serde_json::Value = serde_json::to_value(&info).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "teeVariant": "dstack-tdx", "mrAggregated": "ab", "osImageHash": "", "mrSystem": "0102",
                "appId": "ffff", "composeHash": "0c", "instanceId": "", "deviceId": "", "keyProviderInfo": "7b7d",
                "tcbStatus": "UpToDate", "advisoryIds": ["INTEL-SA-1"]
            })
        );
        let r: BootResponse = serde_json::from_str(r#"{"isAllowed":false,"reason":"no","gatewayAppId":"g"}"#).unwrap();
        assert!(!r.is_allowed);
        assert_eq!(r.reason, "no");
        assert!(serde_json::from_str::<BootResponse>(r#"{"reason":"missing isAllowed"}"#).is_err());
    }

    #[tokio::test]
    async fn unreachable_webhook_is_an_error_not_an_allow() {
        // Port 1 on loopback: nothing listens there.
        let api = AuthApi::webhook("http://127.0.0.1:1", Duration::from_millis(500)).unwrap();
        let info = BootInfo {
            tee_variant: String::new(),
            mr_aggregated: vec![],
            os_image_hash: vec![],
            mr_system: vec![],
            app_id: vec![1; 20],
            compose_hash: vec![],
            instance_id: vec![],
            device_id: vec![],
            key_provider_info: vec![],
            tcb_status: String::new(),
            advisory_ids: vec![],
        };
        assert!(matches!(
            api.is_allowed(&info, false).await,
            Err(PolicyError::Request(_))
        ));
    }

    #[test]
    fn webhook_urls() {
        assert!(AuthApi::webhook("https://x", Duration::from_secs(1)).is_err());
        let AuthApi::Webhook { base_path, .. } =
            AuthApi::webhook("http://h:3000/auth/", Duration::from_secs(1)).unwrap()
        else {
            panic!("not a webhook")
        };
        assert_eq!(base_path, "/auth");
    }
}
