//! The boot events OVMF logs (and extends) for a TDX direct-kernel boot, with the exact TCG event payloads a
//! real TD shows (layouts checked byte for byte against a real dstack TD's log in the tests), so the
//! predicted log looks like the CCEL log a verifier would read.

use sha2::{Digest, Sha384};

use crate::eventlog::{EV_EFI_ACTION, EV_EFI_BOOT_SERVICES_APPLICATION, EV_EVENT_TAG, EV_SEPARATOR, TdxEvent};
use crate::mrtd::guid_bytes;

/// TCG event types not already named in [`crate::eventlog`].
pub const EV_PLATFORM_CONFIG_FLAGS: u32 = 0xa;
pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000a;
pub const EV_EFI_HANDOFF_TABLES2: u32 = 0x8000_000b;

/// EFI_GLOBAL_VARIABLE 8be4df61-93ca-11d2-aa0d-00e098032b8c.
pub const EFI_GLOBAL_VARIABLE: [u8; 16] = guid_bytes(
    0x8be4_df61,
    0x93ca,
    0x11d2,
    [0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c],
);
/// EFI_IMAGE_SECURITY_DATABASE d719b2cb-3d3a-4596-a3bc-dad00e67656f.
pub const EFI_IMAGE_SECURITY_DATABASE: [u8; 16] = guid_bytes(
    0xd719_b2cb,
    0x3d3a,
    0x4596,
    [0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f],
);
/// OVMF's TD HOB configuration-table GUID as logged in the "TdxTable" handoff event.
const TD_HOB_TABLE_GUID: [u8; 16] = guid_bytes(
    0x93bb_96af,
    0xb9f2,
    0x4eb8,
    [0x94, 0x62, 0xe0, 0xba, 0x74, 0x56, 0x42, 0x36],
);
/// Vendor media node GUID of OVMF's QEMU kernel-loader file system.
const KERNEL_FS_GUID: [u8; 16] = guid_bytes(
    0x1428_f772,
    0xb64a,
    0x441e,
    [0xb8, 0xc3, 0x9e, 0xbd, 0xd7, 0xf8, 0x93, 0xc7],
);
/// Firmware volume and file (UiApp / FrontPage) of OVMF's Boot0000 load option.
const OVMF_FV_GUID: [u8; 16] = guid_bytes(
    0x7cb8_bdc9,
    0xf8eb,
    0x4f34,
    [0xaa, 0xea, 0x3e, 0xe4, 0xaf, 0x65, 0x16, 0xa1],
);
const UIAPP_FILE_GUID: [u8; 16] = guid_bytes(
    0x462c_aa21,
    0x7614,
    0x4503,
    [0x83, 0x6e, 0x8a, 0xb6, 0xf4, 0x66, 0x23, 0x31],
);
/// Tagged-event IDs OVMF's Linux loader uses for the command line and the initrd.
const TAG_LOAD_OPTIONS: u32 = 0x8f3b_22ed;
const TAG_INITRD: u32 = 0x8f3b_22ec;

pub fn sha384(data: &[u8]) -> [u8; 48] {
    Sha384::digest(data).into()
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// An event whose digest is `digest` and whose payload is `payload`.
pub fn event(imr: u32, event_type: u32, digest: [u8; 48], payload: Vec<u8>) -> TdxEvent {
    TdxEvent {
        imr,
        event_type,
        digest: digest.to_vec(),
        event: String::new(),
        event_payload: payload,
        version: None,
    }
}

/// An event whose digest is the SHA-384 of its payload.
fn hashed(imr: u32, event_type: u32, payload: Vec<u8>) -> TdxEvent {
    event(imr, event_type, sha384(&payload), payload)
}

/// `UEFI_VARIABLE_DATA { guid, u64 name chars, u64 data len, UTF-16 name, data }`.
pub fn variable_data(guid: &[u8; 16], name: &str, data: &[u8]) -> Vec<u8> {
    let mut v = guid.to_vec();
    v.extend_from_slice(&(name.encode_utf16().count() as u64).to_le_bytes());
    v.extend_from_slice(&(data.len() as u64).to_le_bytes());
    v.extend(utf16(name));
    v.extend_from_slice(data);
    v
}

/// "TdxTable" EV_EFI_HANDOFF_TABLES2: digest = SHA-384 of the measured TD HOB.
pub fn td_hob(measured_hob: &[u8], hob_base: u64) -> TdxEvent {
    let mut p = vec![9];
    p.extend_from_slice(b"TdxTable\0");
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&TD_HOB_TABLE_GUID);
    p.extend_from_slice(&hob_base.to_le_bytes());
    event(0, EV_EFI_HANDOFF_TABLES2, sha384(measured_hob), p)
}

/// The CFV (variable store firmware volume) EV_EFI_PLATFORM_FIRMWARE_BLOB2.
pub fn cfv(cfv_bytes: &[u8], base: u64) -> TdxEvent {
    let desc = b"Fv(XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)\0";
    let mut p = vec![desc.len() as u8];
    p.extend_from_slice(desc);
    p.extend_from_slice(&base.to_le_bytes());
    p.extend_from_slice(&(cfv_bytes.len() as u64).to_le_bytes());
    event(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, sha384(cfv_bytes), p)
}

/// SecureBoot, PK, KEK, db, dbx — all absent (secure boot off), measured with empty data.
pub fn secure_boot_variables() -> Vec<TdxEvent> {
    [
        (&EFI_GLOBAL_VARIABLE, "SecureBoot"),
        (&EFI_GLOBAL_VARIABLE, "PK"),
        (&EFI_GLOBAL_VARIABLE, "KEK"),
        (&EFI_IMAGE_SECURITY_DATABASE, "db"),
        (&EFI_IMAGE_SECURITY_DATABASE, "dbx"),
    ]
    .into_iter()
    .map(|(g, n)| hashed(0, EV_EFI_VARIABLE_DRIVER_CONFIG, variable_data(g, n, &[])))
    .collect()
}

pub fn separator(imr: u32) -> TdxEvent {
    hashed(imr, EV_SEPARATOR, vec![0; 4])
}

/// One "ACPI DATA" event for a fw_cfg ACPI file.
pub fn acpi_data(file: &[u8]) -> TdxEvent {
    event(0, EV_PLATFORM_CONFIG_FLAGS, sha384(file), b"ACPI DATA".to_vec())
}

/// BootOrder = `[0]` and Boot0000 = OVMF's UiApp; the digest covers only the variable's data.
pub fn boot_variables() -> Vec<TdxEvent> {
    let order = 0u16.to_le_bytes();
    let mut option = 0x109u32.to_le_bytes().to_vec(); // ACTIVE | HIDDEN | CATEGORY_APP
    let mut path = vec![4, 7, 20, 0];
    path.extend_from_slice(&OVMF_FV_GUID);
    path.extend_from_slice(&[4, 6, 20, 0]);
    path.extend_from_slice(&UIAPP_FILE_GUID);
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    option.extend_from_slice(&(path.len() as u16).to_le_bytes());
    option.extend(utf16("UiApp\0"));
    option.extend_from_slice(&path);
    vec![
        event(
            0,
            EV_EFI_VARIABLE_BOOT,
            sha384(&order),
            variable_data(&EFI_GLOBAL_VARIABLE, "BootOrder", &order),
        ),
        event(
            0,
            EV_EFI_VARIABLE_BOOT,
            sha384(&option),
            variable_data(&EFI_GLOBAL_VARIABLE, "Boot0000", &option),
        ),
    ]
}

/// The kernel's EV_EFI_BOOT_SERVICES_APPLICATION. The payload's load address and size are runtime values
/// OVMF chooses (not measured); they are left zero here, the device path is the real one.
pub fn kernel(authenticode: [u8; 48]) -> TdxEvent {
    let mut path = vec![4, 3, 20, 0];
    path.extend_from_slice(&KERNEL_FS_GUID);
    let name = utf16("kernel\0");
    path.extend_from_slice(&[4, 4, (4 + name.len()) as u8, 0]);
    path.extend(name);
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    let mut p = vec![0u8; 24]; // location, length, link-time address
    p.extend_from_slice(&(path.len() as u64).to_le_bytes());
    p.extend(path);
    event(1, EV_EFI_BOOT_SERVICES_APPLICATION, authenticode, p)
}

pub fn action(text: &str) -> TdxEvent {
    hashed(1, EV_EFI_ACTION, text.as_bytes().to_vec())
}

fn tagged(id: u32, text: &str, digest: [u8; 48]) -> TdxEvent {
    let mut p = id.to_le_bytes().to_vec();
    p.extend_from_slice(&(text.len() as u32 + 1).to_le_bytes());
    p.extend_from_slice(text.as_bytes());
    p.push(0);
    event(2, EV_EVENT_TAG, digest, p)
}

/// RTMR2: the command line (as [`crate::rtmr::cmdline_digest`]) and the initrd.
pub fn cmdline(measured_cmdline: &str) -> TdxEvent {
    tagged(
        TAG_LOAD_OPTIONS,
        "LOADED_IMAGE::LoadOptions",
        crate::rtmr::cmdline_digest(measured_cmdline),
    )
}

pub fn initrd(initrd: &[u8]) -> TdxEvent {
    tagged(TAG_INITRD, "Linux initrd", sha384(initrd))
}
