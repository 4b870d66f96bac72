#![no_main]
//! The whole data-disk decision on an attacker-controlled disk image (see `common/luks_disk.rs` for the input
//! layout and what is modelled of cryptsetup): guest-init's probe (own LUKS magic checks + `blkid -p`), then
//! the binary-header and JSON-metadata checks of the unlock path, to a verdict — format, open or refuse.
//! Never panics; a disk with a LUKS magic (primary or any secondary offset) is never formatted; an opened
//! header really is LUKS2/sha256 with aes-xts-plain64 keyslot and segment and pbkdf2; a refusal names the
//! field or what was found; a disk with any nonzero byte is never formatted (the image is smaller than the
//! head region guest-init requires to be zero; this found that blkid alone let damaged headers through).
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "common/luks_disk.rs"]
mod harness;

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("luks-disk-fuzz-{}.img", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = image();
    harness::write_image(path, data).expect("writing the fuzz image");
    let verdict = harness::decide(path);
    harness::check_invariants(path, &verdict);
});
