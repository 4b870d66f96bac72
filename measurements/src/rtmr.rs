//! RTMR1 / RTMR2 digests for OVMF direct kernel boot (the parts that do not depend on the VMM's ACPI
//! tables or TD HOB; the whole boot, RTMR0 included, is predicted in [`crate::predict`]).
//!
//! RTMR1 = replay[Authenticode-SHA384(kernel), SHA384("Calling EFI Application from Boot
//! Option"), SHA384(00000000), SHA384("Exit Boot Services Invocation"), SHA384("Exit Boot
//! Services Returned with Success")].
//! RTMR2 = replay[SHA384(UTF-16LE(cmdline) ‖ 0x0000), SHA384(initrd)].

use sha2::{Digest, Sha384};

use crate::authenticode::{PeError, authenticode_sha384};
use crate::eventlog::replay_digests;

/// EV_EFI_ACTION string logged before starting the boot option.
pub const EFI_CALLING_APPLICATION: &str = "Calling EFI Application from Boot Option";
/// EV_EFI_ACTION string logged when ExitBootServices is called.
pub const EFI_EXIT_BOOT_SERVICES: &str = "Exit Boot Services Invocation";
/// EV_EFI_ACTION string logged when ExitBootServices succeeded.
pub const EFI_EXIT_BOOT_SERVICES_OK: &str = "Exit Boot Services Returned with Success";

/// SHA-384 of the 4-byte zero EV_SEPARATOR.
pub fn separator_digest() -> [u8; 48] {
    Sha384::digest([0u8; 4]).into()
}

fn sha384(data: &[u8]) -> [u8; 48] {
    Sha384::digest(data).into()
}

/// Digests extended into RTMR1 given the kernel's Authenticode digest.
pub fn rtmr1_log(kernel_authenticode: [u8; 48]) -> Vec<[u8; 48]> {
    vec![
        kernel_authenticode,
        sha384(EFI_CALLING_APPLICATION.as_bytes()),
        separator_digest(),
        sha384(EFI_EXIT_BOOT_SERVICES.as_bytes()),
        sha384(EFI_EXIT_BOOT_SERVICES_OK.as_bytes()),
    ]
}

/// RTMR1 from the kernel's Authenticode digest.
pub fn rtmr1_from_digest(kernel_authenticode: [u8; 48]) -> [u8; 48] {
    replay_digests(rtmr1_log(kernel_authenticode).iter())
}

/// RTMR1 for a kernel image exactly as the firmware loads it (for QEMU < 9 or unpatched
/// OVMF that is the loader-patched bzImage; see dstack-facts §5).
pub fn rtmr1(kernel_pe: &[u8]) -> Result<[u8; 48], PeError> {
    Ok(rtmr1_from_digest(authenticode_sha384(kernel_pe)?))
}

/// SHA-384 of the kernel command line as OVMF measures LoadOptions: UTF-16LE plus a NUL.
pub fn cmdline_digest(cmdline: &str) -> [u8; 48] {
    let mut h = Sha384::new();
    for unit in cmdline.encode_utf16() {
        h.update(unit.to_le_bytes());
    }
    h.update([0u8; 2]);
    h.finalize().into()
}

/// Digests extended into RTMR2.
pub fn rtmr2_log(cmdline: &str, initrd: &[u8]) -> Vec<[u8; 48]> {
    vec![cmdline_digest(cmdline), sha384(initrd)]
}

/// RTMR2 from the command line and initrd.
pub fn rtmr2(cmdline: &str, initrd: &[u8]) -> [u8; 48] {
    replay_digests(rtmr2_log(cmdline, initrd).iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_and_rtmr2_match_hashlib() {
        // python3: hashlib.sha384("console=ttyS0 initrd=initrd".encode("utf-16-le") + b"\0\0")
        assert_eq!(hex::encode(cmdline_digest("console=ttyS0 initrd=initrd")), CMDLINE);
        // python3: replay of [that, hashlib.sha384(b"initrd-bytes")] from 48 zero bytes
        assert_eq!(
            hex::encode(rtmr2("console=ttyS0 initrd=initrd", b"initrd-bytes")),
            RTMR2
        );
    }

    const CMDLINE: &str =
        "1d26f8aff8992fdfc37e88b4fdf4a1a0ebb815a2ce925ea3046b3ba1f24a933e75a163af2af579268c20ca5f476f5386";
    const RTMR2: &str =
        "6bc86de2b89c71ac5deb93cf4ee665fa7b447376ad3ca05371382a23a0a51a26027b550565c28711b1b901ee1806fe1c";

    #[test]
    fn separator_is_known_constant() {
        // The separator digest as it appears in every real TDX event log (tdx-facts §3.3).
        assert!(hex::encode(separator_digest()).starts_with("394341b7182cd227"));
    }
}
