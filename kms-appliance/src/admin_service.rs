//! The `Admin` RPC service (`[core.admin]`, its own plain-HTTP listener, loopback by default):
//! `ClearImageCache{image_hash, config_hash}` (see [`crate::image`] for what each key removes) and
//! `RevokeCerts{serial_numbers, app_id, issued_before, reason}` (see [`crate::revocation`]; takes effect in
//! the next `GetCrl`).
//!
//! Every call must carry `Authorization: Bearer <auth_token>`; the token is compared in constant time. An empty
//! configured token refuses every call (there is no unauthenticated admin mode).

use std::sync::Arc;

use dstack_rpc::kms::{AdminRpc, ClearImageCacheRequest, RevokeCertsRequest, RevokeCertsResponse};
use dstack_rpc::{CallContext, Empty, RpcError};

use crate::image::ImageVerifier;
use crate::revocation::{RevocationStore, RevokeRequest};

/// The `Admin` handler.
#[derive(Debug, Clone)]
pub struct AdminService {
    token: Arc<zeroize::Zeroizing<String>>,
    image: Arc<ImageVerifier>,
    revocations: Arc<RevocationStore>,
}

impl AdminService {
    pub fn new(token: &str, image: Arc<ImageVerifier>, revocations: Arc<RevocationStore>) -> Self {
        Self {
            token: Arc::new(zeroize::Zeroizing::new(token.to_owned())),
            image,
            revocations,
        }
    }

    fn check(&self, ctx: &CallContext, method: &str) -> Result<(), RpcError> {
        let ok = !self.token.is_empty()
            && ctx
                .bearer_token()
                .is_some_and(|t| constant_time_eq(t.as_bytes(), self.token.as_bytes()));
        if ok {
            Ok(())
        } else {
            tracing::warn!(method, remote = %ctx.remote, "admin call refused: missing or wrong bearer token");
            Err(RpcError::Handler(format!(
                "{method} refused: a valid admin bearer token is required"
            )))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminRpc for AdminService {
    async fn clear_image_cache(&self, ctx: &CallContext, req: ClearImageCacheRequest) -> Result<Empty, RpcError> {
        self.check(ctx, "ClearImageCache")?;
        self.image
            .clear(&req.image_hash, &req.config_hash)
            .map_err(|e| RpcError::Handler(format!("ClearImageCache: {e}")))?;
        tracing::info!(image_hash = %req.image_hash, config_hash = %req.config_hash, "image cache cleared");
        Ok(Empty {})
    }

    async fn revoke_certs(&self, ctx: &CallContext, req: RevokeCertsRequest) -> Result<RevokeCertsResponse, RpcError> {
        self.check(ctx, "RevokeCerts")?;
        let request = RevokeRequest {
            serials: req.serial_numbers,
            app_id: req.app_id,
            issued_before: req.issued_before,
            reason: req.reason,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let store = Arc::clone(&self.revocations);
        let r = request.clone();
        let state = tokio::task::spawn_blocking(move || store.revoke(&r, now))
            .await
            .map_err(|e| RpcError::Internal(format!("RevokeCerts: {e}")))?
            .map_err(|e| RpcError::Handler(e.to_string()))?;
        tracing::warn!(
            serials = ?request.serials,
            app_id = %hex::encode(&request.app_id),
            issued_before = request.issued_before,
            reason = %request.reason,
            remote = %ctx.remote,
            crl_number = state.crl_number,
            "certificates revoked"
        );
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(RevokeCertsResponse {
            crl_number: state.crl_number,
            revoked_serials: count(state.serials.len()),
            revoked_apps: count(state.apps.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
