//! The ACPI power button: the VM manager's graceful `ShutdownVm` presses it (QMP `system_powerdown` on the
//! `tcg` backend, as a TD's host would; on `kvm` our VMM's fixed-feature button, PM1 `PWRBTN_STS` + SCI,
//! through its control socket). Either way the kernel's ACPI button driver reports it as `KEY_POWER` on an
//! input device named "Power Button"; a watcher thread turns a press into an orderly power-off
//! ([`super::request_power`]).
//!
//! Input events are `struct input_event` (linux/input.h): on 64-bit, `timeval` (16 bytes), `u16 type`,
//! `u16 code`, `s32 value` = 24 bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

/// `EV_KEY` (linux/input-event-codes.h).
pub const EV_KEY: u16 = 0x01;
/// `KEY_POWER` (linux/input-event-codes.h).
pub const KEY_POWER: u16 = 116;
/// Size of `struct input_event` on x86_64.
pub const EVENT_SIZE: usize = 24;

/// True when one raw event is a power-button press (value 1; releases and repeats are ignored).
pub fn is_power_press(event: &[u8; EVENT_SIZE]) -> bool {
    let ty = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

/// Event devices under `root` whose name says power button (`/sys/class/input/eventN/device/name`).
pub fn find_devices(root: &Path) -> Vec<PathBuf> {
    let class = root.join("sys/class/input");
    let Ok(entries) = std::fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("event") {
                return None;
            }
            let label = std::fs::read_to_string(e.path().join("device/name")).ok()?;
            label
                .trim()
                .eq_ignore_ascii_case("Power Button")
                .then(|| root.join("dev/input").join(&name))
        })
        .collect();
    found.sort();
    found
}

/// Reads events from `dev` until it ends; calls `on_press` for each power-button press.
pub fn watch(mut dev: impl Read, mut on_press: impl FnMut()) -> std::io::Result<()> {
    let mut ev = [0u8; EVENT_SIZE];
    loop {
        dev.read_exact(&mut ev)?;
        if is_power_press(&ev) {
            on_press();
        }
    }
}

/// Starts one watcher thread per power-button device under `root`; a press asks PID 1 to power off.
pub fn start(root: &Path) {
    let devices = find_devices(root);
    if devices.is_empty() {
        tracing::info!("no ACPI power button input device: ShutdownVm must use the guest API");
        return;
    }
    for dev in devices {
        let spawned = std::thread::Builder::new().name("power-button".into()).spawn({
            let dev = dev.clone();
            move || match std::fs::File::open(&dev) {
                Ok(f) => {
                    let r = watch(f, || {
                        super::request_power(super::PowerAction::PowerOff, "ACPI power button pressed");
                    });
                    if let Err(e) = r {
                        tracing::warn!("power button {}: {e}", dev.display());
                    }
                }
                Err(e) => tracing::warn!("power button {}: {e}", dev.display()),
            }
        });
        match spawned {
            Ok(_) => tracing::info!("watching the ACPI power button on {}", dev.display()),
            Err(e) => tracing::warn!("power button watcher: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[..8].copy_from_slice(&1_700_000_000i64.to_ne_bytes());
        e[16..18].copy_from_slice(&ty.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 2)), "autorepeat");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "EV_SYN");
    }

    #[test]
    fn watch_reports_presses_and_ends_with_the_stream() {
        let mut bytes = Vec::new();
        for e in [
            event(EV_KEY, KEY_POWER, 1),
            event(0, 0, 0),
            event(EV_KEY, KEY_POWER, 0),
            event(EV_KEY, KEY_POWER, 1),
        ] {
            bytes.extend_from_slice(&e);
        }
        bytes.extend_from_slice(&[1, 2, 3]); // a truncated event: the stream ends with an error
        let mut presses = 0;
        let err = watch(bytes.as_slice(), || presses += 1).unwrap_err();
        assert_eq!(presses, 2);
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn finds_power_button_devices_by_name() {
        let root = tempfile::tempdir().unwrap();
        for (ev, name) in [
            ("event0", "Power Button\n"),
            ("event1", "AT Translated Set 2 keyboard\n"),
        ] {
            let d = root.path().join("sys/class/input").join(ev).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
        }
        std::fs::create_dir_all(root.path().join("sys/class/input/input0")).unwrap();
        assert_eq!(find_devices(root.path()), vec![root.path().join("dev/input/event0")]);
        assert!(find_devices(&root.path().join("missing")).is_empty());
    }
}
