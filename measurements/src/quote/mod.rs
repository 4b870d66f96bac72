//! TDX quote parsing (v4 and v5; TD 1.0, TD 1.5 and TD 1.5-ex report bodies).
//!
//! Layout (all integers little-endian): 48-byte header; in v5 a 6-byte body descriptor
//! `{u16 type, u32 size}`; the TD report body; `u32` signature-data length; ECDSA-P256
//! signature data (quote signature, attestation key, certification data). Certification
//! data type 6 wraps the QE report, its PCK signature, the QE auth data and an inner
//! certification data block (type 5 = PCK chain PEM).
//!
//! Parsing is purely structural: it never trusts lengths without a bounds check, and every
//! error names the field and the absolute offset. Trailing bytes after the signature data
//! (real quotes carry zero padding) are allowed and ignored.

mod json;
pub mod reader;

pub use json::QuoteJson;
pub use reader::{ParseError, Reader};

/// Header length in bytes.
pub const HEADER_LEN: usize = 48;
/// `tee_type` of a TDX quote.
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Attestation key type 2 = ECDSA-256-with-P-256 curve.
pub const ATT_KEY_TYPE_ECDSA_P256: u16 = 2;
/// Intel's QE vendor id.
pub const INTEL_QE_VENDOR_ID: [u8; 16] = [
    0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07,
];
/// Certification data type: PCK certificate chain (PEM).
pub const CERT_TYPE_PCK_CHAIN: u16 = 5;
/// Certification data type: QE report certification data.
pub const CERT_TYPE_QE_REPORT: u16 = 6;
/// Size of an SGX report body (the QE report).
pub const QE_REPORT_LEN: usize = 384;
/// TD 1.0 report body length.
pub const TD_REPORT10_LEN: usize = 584;
/// TD 1.5 report body length.
pub const TD_REPORT15_LEN: usize = 648;
/// TD 1.5 "ex" report body length (TD 1.5 plus service-TD / partitioning fields).
pub const TD_REPORT15_EX_LEN: usize = 885;

/// The quote header (48 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub attestation_key_type: u16,
    pub tee_type: u32,
    pub reserved1: [u8; 2],
    pub reserved2: [u8; 2],
    pub qe_vendor_id: [u8; 16],
    pub user_data: [u8; 20],
}

impl Header {
    fn parse(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        Ok(Self {
            version: r.u16("header.version")?,
            attestation_key_type: r.u16("header.attestation_key_type")?,
            tee_type: r.u32("header.tee_type")?,
            reserved1: r.array("header.reserved1")?,
            reserved2: r.array("header.reserved2")?,
            qe_vendor_id: r.array("header.qe_vendor_id")?,
            user_data: r.array("header.user_data")?,
        })
    }

    /// Serialize back to the 48 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&self.version.to_le_bytes());
        out[2..4].copy_from_slice(&self.attestation_key_type.to_le_bytes());
        out[4..8].copy_from_slice(&self.tee_type.to_le_bytes());
        out[8..10].copy_from_slice(&self.reserved1);
        out[10..12].copy_from_slice(&self.reserved2);
        out[12..28].copy_from_slice(&self.qe_vendor_id);
        out[28..48].copy_from_slice(&self.user_data);
        out
    }
}

/// Which TD report body the quote carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// TD 1.0 (584 bytes): v4 quotes, or v5 body type 2.
    Td10,
    /// TD 1.5 (648 bytes): v5 body type 3.
    Td15,
    /// TD 1.5 with extended fields (885 bytes): v5 body type 4.
    Td15Ex,
}

impl BodyType {
    pub fn body_len(self) -> usize {
        match self {
            BodyType::Td10 => TD_REPORT10_LEN,
            BodyType::Td15 => TD_REPORT15_LEN,
            BodyType::Td15Ex => TD_REPORT15_EX_LEN,
        }
    }

    /// The v5 body-descriptor type code.
    pub fn code(self) -> u16 {
        match self {
            BodyType::Td10 => 2,
            BodyType::Td15 => 3,
            BodyType::Td15Ex => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BodyType::Td10 => "td10",
            BodyType::Td15 => "td15",
            BodyType::Td15Ex => "td15ex",
        }
    }
}

/// TD 1.5 additions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Td15Fields {
    pub tee_tcb_svn2: [u8; 16],
    pub mr_service_td: [u8; 48],
}

/// TD 1.5-ex additions (after the TD 1.5 fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Td15ExFields {
    pub vmid: u8,
    pub td_id: [u8; 32],
    pub dev_info: [u8; 48],
    pub init_service_td_hash: [u8; 48],
    pub init_service_td_attributes: [u8; 8],
    pub init_cpu_svn: [u8; 16],
    pub init_tee_tcb_svn: [u8; 16],
    pub init_tee_fmspc: [u8; 12],
    pub cur_service_td_hash: [u8; 48],
    pub cur_service_td_attributes: [u8; 8],
}

/// The TD report body as carried in the quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdReport {
    pub tee_tcb_svn: [u8; 16],
    pub mr_seam: [u8; 48],
    pub mr_signer_seam: [u8; 48],
    pub seam_attributes: [u8; 8],
    pub td_attributes: [u8; 8],
    pub xfam: [u8; 8],
    pub mr_td: [u8; 48],
    pub mr_config_id: [u8; 48],
    pub mr_owner: [u8; 48],
    pub mr_owner_config: [u8; 48],
    /// RTMR0..RTMR3.
    pub rtmr: [[u8; 48]; 4],
    pub report_data: [u8; 64],
    pub td15: Option<Td15Fields>,
    pub td15ex: Option<Td15ExFields>,
}

impl TdReport {
    /// Parse a body of the given type from `r` (which must be positioned at the body).
    pub fn parse(r: &mut Reader<'_>, body: BodyType) -> Result<Self, ParseError> {
        let mut report = Self {
            tee_tcb_svn: r.array("report.tee_tcb_svn")?,
            mr_seam: r.array("report.mr_seam")?,
            mr_signer_seam: r.array("report.mr_signer_seam")?,
            seam_attributes: r.array("report.seam_attributes")?,
            td_attributes: r.array("report.td_attributes")?,
            xfam: r.array("report.xfam")?,
            mr_td: r.array("report.mrtd")?,
            mr_config_id: r.array("report.mrconfigid")?,
            mr_owner: r.array("report.mrowner")?,
            mr_owner_config: r.array("report.mrownerconfig")?,
            rtmr: [
                r.array("report.rtmr0")?,
                r.array("report.rtmr1")?,
                r.array("report.rtmr2")?,
                r.array("report.rtmr3")?,
            ],
            report_data: r.array("report.report_data")?,
            td15: None,
            td15ex: None,
        };
        if matches!(body, BodyType::Td15 | BodyType::Td15Ex) {
            report.td15 = Some(Td15Fields {
                tee_tcb_svn2: r.array("report.tee_tcb_svn2")?,
                mr_service_td: r.array("report.mr_service_td")?,
            });
        }
        if body == BodyType::Td15Ex {
            report.td15ex = Some(Td15ExFields {
                vmid: r.u8("report.vmid")?,
                td_id: r.array("report.td_id")?,
                dev_info: r.array("report.dev_info")?,
                init_service_td_hash: r.array("report.init_service_td_hash")?,
                init_service_td_attributes: r.array("report.init_service_td_attributes")?,
                init_cpu_svn: r.array("report.init_cpu_svn")?,
                init_tee_tcb_svn: r.array("report.init_tee_tcb_svn")?,
                init_tee_fmspc: r.array("report.init_tee_fmspc")?,
                cur_service_td_hash: r.array("report.cur_service_td_hash")?,
                cur_service_td_attributes: r.array("report.cur_service_td_attributes")?,
            });
        }
        Ok(report)
    }

    /// Serialize a TD 1.0 body (584 bytes); TD 1.5 extras are not included.
    pub fn to_td10_bytes(&self) -> [u8; TD_REPORT10_LEN] {
        let mut out = [0u8; TD_REPORT10_LEN];
        let parts: [&[u8]; 15] = [
            &self.tee_tcb_svn,
            &self.mr_seam,
            &self.mr_signer_seam,
            &self.seam_attributes,
            &self.td_attributes,
            &self.xfam,
            &self.mr_td,
            &self.mr_config_id,
            &self.mr_owner,
            &self.mr_owner_config,
            &self.rtmr[0],
            &self.rtmr[1],
            &self.rtmr[2],
            &self.rtmr[3],
            &self.report_data,
        ];
        let mut pos = 0;
        for p in parts {
            out[pos..pos + p.len()].copy_from_slice(p);
            pos += p.len();
        }
        out
    }

    /// A TD 1.0 report with every field zero (handy for building quotes).
    pub fn zeroed() -> Self {
        Self {
            tee_tcb_svn: [0; 16],
            mr_seam: [0; 48],
            mr_signer_seam: [0; 48],
            seam_attributes: [0; 8],
            td_attributes: [0; 8],
            xfam: [0; 8],
            mr_td: [0; 48],
            mr_config_id: [0; 48],
            mr_owner: [0; 48],
            mr_owner_config: [0; 48],
            rtmr: [[0; 48]; 4],
            report_data: [0; 64],
            td15: None,
            td15ex: None,
        }
    }
}

/// The SGX report body of the Quoting Enclave (384 bytes), with the fields verifiers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QeReport {
    pub raw: [u8; QE_REPORT_LEN],
    pub cpu_svn: [u8; 16],
    pub misc_select: u32,
    pub attributes: [u8; 16],
    pub mr_enclave: [u8; 32],
    pub mr_signer: [u8; 32],
    pub isv_prod_id: u16,
    pub isv_svn: u16,
    pub report_data: [u8; 64],
}

impl QeReport {
    /// Parse a 384-byte SGX report body (cannot fail: every field lies inside 384 bytes).
    pub fn from_raw(raw: [u8; QE_REPORT_LEN]) -> Self {
        Self {
            cpu_svn: fixed(&raw, 0),
            misc_select: u32::from_le_bytes(fixed(&raw, 16)),
            attributes: fixed(&raw, 48),
            mr_enclave: fixed(&raw, 64),
            mr_signer: fixed(&raw, 128),
            isv_prod_id: u16::from_le_bytes(fixed(&raw, 256)),
            isv_svn: u16::from_le_bytes(fixed(&raw, 258)),
            report_data: fixed(&raw, 320),
            raw,
        }
    }
}

/// Copy `N` bytes at `off`; zeros if out of range (only used with in-range constants).
fn fixed<const N: usize>(raw: &[u8], off: usize) -> [u8; N] {
    raw.get(off..off + N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0u8; N])
}

/// Certification data type 6 payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QeReportCertData {
    pub qe_report: QeReport,
    /// ECDSA P-256 r‖s over the 384-byte QE report, by the PCK leaf key.
    pub qe_report_signature: [u8; 64],
    pub qe_auth_data: Vec<u8>,
    pub inner_cert_type: u16,
    pub inner_cert_data: Vec<u8>,
}

impl QeReportCertData {
    /// The PCK chain as PEM text when the inner type is 5 (trailing NULs stripped).
    pub fn pck_chain_pem(&self) -> Option<String> {
        if self.inner_cert_type != CERT_TYPE_PCK_CHAIN {
            return None;
        }
        let end = self.inner_cert_data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        std::str::from_utf8(&self.inner_cert_data[..end])
            .ok()
            .map(str::to_owned)
    }
}

/// Certification data from the signature block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificationData {
    QeReport(Box<QeReportCertData>),
    Other { cert_type: u16, data: Vec<u8> },
}

/// ECDSA-256 quote signature data ("auth data", v4/v5 layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthData {
    /// r‖s over SHA-256 of the signed region (header [‖ descriptor] ‖ body).
    pub signature: [u8; 64],
    /// Raw uncompressed P-256 point x‖y (no 0x04 prefix).
    pub attestation_key: [u8; 64],
    pub certification: CertificationData,
}

impl AuthData {
    pub fn qe_cert_data(&self) -> Option<&QeReportCertData> {
        match &self.certification {
            CertificationData::QeReport(q) => Some(q),
            CertificationData::Other { .. } => None,
        }
    }
}

/// A parsed TDX quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub header: Header,
    pub body_type: BodyType,
    pub report: TdReport,
    /// Bytes covered by the quote signature (header, v5 descriptor, body).
    pub signed_len: usize,
    pub auth_data: AuthData,
    /// Offset just past the signature data; later bytes are padding.
    pub end: usize,
}

/// Errors from [`Quote::parse`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QuoteError {
    #[error("malformed quote: {0}")]
    Parse(#[from] ParseError),
}

impl Quote {
    /// Parse a raw TDX quote (v4 or v5).
    pub fn parse(raw: &[u8]) -> Result<Self, QuoteError> {
        let mut r = Reader::new(raw);
        let header = Header::parse(&mut r)?;
        if header.tee_type != TEE_TYPE_TDX {
            return Err(r
                .invalid(
                    "header.tee_type",
                    4,
                    format!("0x{:x} is not TDX (0x81)", header.tee_type),
                )
                .into());
        }
        if header.attestation_key_type != ATT_KEY_TYPE_ECDSA_P256 {
            return Err(r
                .invalid(
                    "header.attestation_key_type",
                    2,
                    format!("{} unsupported (only 2 = ECDSA P-256)", header.attestation_key_type),
                )
                .into());
        }
        let body_type = match header.version {
            4 => BodyType::Td10,
            5 => {
                let off = r.pos();
                let ty = r.u16("body_descriptor.type")?;
                let size = r.u32("body_descriptor.size")? as usize;
                let body = match ty {
                    2 => BodyType::Td10,
                    3 => BodyType::Td15,
                    4 => BodyType::Td15Ex,
                    other => {
                        return Err(r
                            .invalid("body_descriptor.type", off, format!("{other} is not a TD report body"))
                            .into());
                    }
                };
                if size != body.body_len() {
                    return Err(r
                        .invalid(
                            "body_descriptor.size",
                            off + 2,
                            format!("{size} does not match {} for body type {ty}", body.body_len()),
                        )
                        .into());
                }
                body
            }
            v => {
                return Err(r
                    .invalid("header.version", 0, format!("{v} unsupported (expected 4 or 5)"))
                    .into());
            }
        };
        let report = TdReport::parse(&mut r, body_type)?;
        let signed_len = r.pos();
        let sig_len = r.len_u32("signature_data_len")?;
        let sig_start = r.pos();
        let sig = r.bytes(sig_len, "signature_data")?;
        let auth_data = parse_auth_data(sig, sig_start)?;
        Ok(Self {
            header,
            body_type,
            report,
            signed_len,
            auth_data,
            end: sig_start + sig_len,
        })
    }

    /// The PCK chain PEM from the certification data, if present.
    pub fn pck_chain_pem(&self) -> Option<String> {
        self.auth_data.qe_cert_data().and_then(QeReportCertData::pck_chain_pem)
    }
}

/// Parse the v4/v5 ECDSA signature data. `base` is the absolute offset of `sig` in the quote.
fn parse_auth_data(sig: &[u8], base: usize) -> Result<AuthData, ParseError> {
    let mut r = Reader::new(sig);
    let mut inner = || -> Result<AuthData, ParseError> {
        let signature = r.array("auth.signature")?;
        let attestation_key = r.array("auth.attestation_key")?;
        let cert_type = r.u16("auth.cert_data_type")?;
        let cert_len = r.len_u32("auth.cert_data_size")?;
        let cert_off = r.pos();
        let cert = r.bytes(cert_len, "auth.cert_data")?;
        let certification = if cert_type == CERT_TYPE_QE_REPORT {
            let qe = parse_qe_cert_data(cert).map_err(|e| e.rebase(cert_off))?;
            CertificationData::QeReport(Box::new(qe))
        } else {
            CertificationData::Other {
                cert_type,
                data: cert.to_vec(),
            }
        };
        Ok(AuthData {
            signature,
            attestation_key,
            certification,
        })
    };
    inner().map_err(|e| e.rebase(base))
}

fn parse_qe_cert_data(buf: &[u8]) -> Result<QeReportCertData, ParseError> {
    let mut r = Reader::new(buf);
    let qe_report = QeReport::from_raw(r.array("qe_cert.qe_report")?);
    let qe_report_signature = r.array("qe_cert.qe_report_signature")?;
    let auth_len = r.u16("qe_cert.qe_auth_data_size")? as usize;
    let qe_auth_data = r.bytes(auth_len, "qe_cert.qe_auth_data")?.to_vec();
    let inner_cert_type = r.u16("qe_cert.inner_cert_type")?;
    let inner_len = r.len_u32("qe_cert.inner_cert_size")?;
    let inner_cert_data = r.bytes(inner_len, "qe_cert.inner_cert_data")?.to_vec();
    Ok(QeReportCertData {
        qe_report,
        qe_report_signature,
        qe_auth_data,
        inner_cert_type,
        inner_cert_data,
    })
}

/// Errors from [`decode_quote_input`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InputError {
    #[error("quote input is empty")]
    Empty,
    #[error("quote hex text: {0}")]
    Hex(String),
}

/// Accept a raw binary quote or hex text (whitespace-trimmed, optional `0x`).
pub fn decode_quote_input(data: &[u8]) -> Result<Vec<u8>, InputError> {
    let trimmed = data.trim_ascii();
    if trimmed.is_empty() {
        return Err(InputError::Empty);
    }
    let text = trimmed
        .strip_prefix(b"0x")
        .or_else(|| trimmed.strip_prefix(b"0X"))
        .unwrap_or(trimmed);
    // A binary TDX quote starts with version 4/5 as u16 LE: byte 1 is 0, never a hex digit.
    let looks_hex = text.iter().all(u8::is_ascii_hexdigit);
    if !looks_hex {
        return Ok(data.to_vec());
    }
    hex::decode(text).map_err(|e| InputError::Hex(e.to_string()))
}

#[cfg(test)]
mod tests;
