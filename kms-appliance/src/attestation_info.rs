//! `Onboard.GetAttestationInfo` (dstack-compatible name and fields): who this KMS is, served before it holds
//! keys, so an operator can allow it as a KMS (aggregated MR, device id, OS image) before onboarding it.
//!
//! `AttestationInfoResponse{device_id = 1, mr_aggregated = 2, os_image_hash = 3, tee_variant = 4,
//! site_name = 5, eth_rpc_url = 6, kms_contract_address = 7, ppid = 8}`:
//! * from a fresh quote of our own TEE (report data all zero) and our event log, which must replay to the
//!   quote (an inconsistent log is an error, not an answer): `mr_aggregated = sha256(mrtd ‖ rtmr0..3)`,
//!   `ppid` from the quote's PCK certificate and `device_id = sha256(ppid)` (both empty when the quote carries
//!   none). The quote is reported, not verified: whoever allows this KMS verifies it (as with dstack).
//! * `os_image_hash`: from our vm_config (`[core.onboard] vm_config_file`), else the `os-image-hash` event.
//! * `tee_variant`: `dstack-tdx`, or (ours, as in BootInfo) `dstack-simulated-tdx` for the simulated module.
//! * `site_name` from `[core] site_name`; `eth_rpc_url` and `kms_contract_address` from the on-chain policy
//!   (empty for the other policies).

use dstack_measurements::eventlog::derive_identity;
use dstack_measurements::quote::Quote;
use dstack_measurements::sim::is_simulated_quote;
use dstack_measurements::verify::{device_id_of_ppid, self_reported_ppid};
use dstack_rpc::kms::AttestationInfoResponse;

use crate::KmsError;
use crate::onboard::OnboardContext;

pub async fn attestation_info(ctx: &OnboardContext) -> Result<AttestationInfoResponse, KmsError> {
    let tee = ctx
        .tee
        .as_ref()
        .ok_or_else(|| KmsError::Config("this KMS runs without a TEE: it has no attestation to report".into()))?;
    let att = tee.attest([0u8; 64]).await?;
    let quote = Quote::parse(&att.quote).map_err(|e| KmsError::Config(format!("own quote: {e}")))?;
    let vm_config = Some(ctx.vm_config.as_str()).filter(|c| !c.trim().is_empty());
    let id = derive_identity(&att.event_log, &quote.report, vm_config)
        .map_err(|e| KmsError::Config(format!("own event log does not match own quote: {e}")))?;
    let ppid = self_reported_ppid(&quote).unwrap_or_default();
    Ok(AttestationInfoResponse {
        device_id: device_id_of_ppid(&ppid),
        mr_aggregated: id.mr_aggregated,
        os_image_hash: id.os_image_hash,
        tee_variant: if is_simulated_quote(&quote) {
            "dstack-simulated-tdx".into()
        } else {
            "dstack-tdx".into()
        },
        site_name: ctx.site_name.clone(),
        eth_rpc_url: ctx.eth_rpc_url.clone(),
        kms_contract_address: ctx.kms_contract_address.clone(),
        ppid,
    })
}
