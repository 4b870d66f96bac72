//! The CLI / API JSON view of a quote: byte fields as lowercase hex without `0x`.

use serde::{Deserialize, Serialize};

use super::{CertificationData, Quote, TdReport};

/// JSON view of a parsed quote (`dstack-measure quote --json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuoteJson {
    pub version: u16,
    pub attestation_key_type: u16,
    pub tee_type: u32,
    pub body_type: String,
    pub qe_vendor_id: String,
    pub user_data: String,
    pub tee_tcb_svn: String,
    pub mrseam: String,
    pub mrsignerseam: String,
    pub seam_attributes: String,
    pub td_attributes: String,
    pub xfam: String,
    pub mrtd: String,
    pub mrconfigid: String,
    pub mrowner: String,
    pub mrownerconfig: String,
    pub rtmr0: String,
    pub rtmr1: String,
    pub rtmr2: String,
    pub rtmr3: String,
    pub report_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee_tcb_svn2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mr_service_td: Option<String>,
    pub signature: String,
    pub attestation_key: String,
    pub cert_data_type: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qe_report: Option<QeReportJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pck_chain_pem: Option<String>,
}

/// JSON view of the QE report certification data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QeReportJson {
    pub raw: String,
    pub mr_enclave: String,
    pub mr_signer: String,
    pub isv_prod_id: u16,
    pub isv_svn: u16,
    pub report_data: String,
    pub signature: String,
    pub auth_data: String,
    pub inner_cert_type: u16,
}

impl From<&Quote> for QuoteJson {
    fn from(q: &Quote) -> Self {
        let r: &TdReport = &q.report;
        let (cert_data_type, qe_report) = match &q.auth_data.certification {
            CertificationData::QeReport(c) => (
                super::CERT_TYPE_QE_REPORT,
                Some(QeReportJson {
                    raw: hex::encode(c.qe_report.raw),
                    mr_enclave: hex::encode(c.qe_report.mr_enclave),
                    mr_signer: hex::encode(c.qe_report.mr_signer),
                    isv_prod_id: c.qe_report.isv_prod_id,
                    isv_svn: c.qe_report.isv_svn,
                    report_data: hex::encode(c.qe_report.report_data),
                    signature: hex::encode(c.qe_report_signature),
                    auth_data: hex::encode(&c.qe_auth_data),
                    inner_cert_type: c.inner_cert_type,
                }),
            ),
            CertificationData::Other { cert_type, .. } => (*cert_type, None),
        };
        Self {
            version: q.header.version,
            attestation_key_type: q.header.attestation_key_type,
            tee_type: q.header.tee_type,
            body_type: q.body_type.name().to_owned(),
            qe_vendor_id: hex::encode(q.header.qe_vendor_id),
            user_data: hex::encode(q.header.user_data),
            tee_tcb_svn: hex::encode(r.tee_tcb_svn),
            mrseam: hex::encode(r.mr_seam),
            mrsignerseam: hex::encode(r.mr_signer_seam),
            seam_attributes: hex::encode(r.seam_attributes),
            td_attributes: hex::encode(r.td_attributes),
            xfam: hex::encode(r.xfam),
            mrtd: hex::encode(r.mr_td),
            mrconfigid: hex::encode(r.mr_config_id),
            mrowner: hex::encode(r.mr_owner),
            mrownerconfig: hex::encode(r.mr_owner_config),
            rtmr0: hex::encode(r.rtmr[0]),
            rtmr1: hex::encode(r.rtmr[1]),
            rtmr2: hex::encode(r.rtmr[2]),
            rtmr3: hex::encode(r.rtmr[3]),
            report_data: hex::encode(r.report_data),
            tee_tcb_svn2: r.td15.as_ref().map(|t| hex::encode(t.tee_tcb_svn2)),
            mr_service_td: r.td15.as_ref().map(|t| hex::encode(t.mr_service_td)),
            signature: hex::encode(q.auth_data.signature),
            attestation_key: hex::encode(q.auth_data.attestation_key),
            cert_data_type,
            qe_report,
            pck_chain_pem: q.pck_chain_pem(),
        }
    }
}
