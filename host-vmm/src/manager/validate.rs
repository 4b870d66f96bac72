//! Checks of client-supplied VM configurations. Every error names the field.

use dstack_rpc::vmm::{PortMapping, VmConfiguration};

use super::backend::Image;
use super::config::VmmConfig;

/// Encrypted env blobs larger than this are refused.
pub const MAX_ENCRYPTED_ENV: usize = 256 << 10;
/// User config larger than this is refused.
pub const MAX_USER_CONFIG: usize = 1 << 20;

/// A refused configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid VM configuration: {field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// VM names: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn name(name: &str) -> Result<(), ValidationError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(bad(
            "name",
            format!("{name:?}: 1-64 characters of A-Z a-z 0-9 . _ -, not starting with . or -"),
        ));
    }
    Ok(())
}

/// app-compose.json, strictly (crates/types).
pub fn compose(raw: &str) -> Result<(), ValidationError> {
    dstack_types::AppCompose::from_slice(raw.as_bytes())
        .map(|_| ())
        .map_err(|e| bad("compose_file", e.to_string()))
}

/// Shape limits.
pub fn resources(cfg: &VmmConfig, vcpu: u32, memory: u32, disk: u32) -> Result<(), ValidationError> {
    let c = &cfg.cvm;
    if vcpu == 0 || vcpu > c.max_vcpu_per_vm {
        return Err(bad(
            "vcpu",
            format!("{vcpu}: must be 1..={} ([cvm] max_vcpu_per_vm)", c.max_vcpu_per_vm),
        ));
    }
    if !(64..=c.max_memory_per_vm_mb).contains(&memory) {
        return Err(bad(
            "memory",
            format!(
                "{memory} MB: must be 64..={} ([cvm] max_memory_per_vm_mb)",
                c.max_memory_per_vm_mb
            ),
        ));
    }
    if disk == 0 || disk > c.max_disk_size_gb {
        return Err(bad(
            "disk_size",
            format!("{disk} GB: must be 1..={} ([cvm] max_disk_size_gb)", c.max_disk_size_gb),
        ));
    }
    Ok(())
}

/// Port mappings: protocol, ranges, duplicates within the VM.
pub fn ports(cfg: &VmmConfig, ports: &[PortMapping]) -> Result<(), ValidationError> {
    let pm = &cfg.cvm.port_mapping;
    for (i, p) in ports.iter().enumerate() {
        let field = format!("ports[{i}]");
        if !pm.enabled {
            return Err(bad(
                field,
                "port mapping is disabled ([cvm.port_mapping] enabled = false)",
            ));
        }
        if p.protocol != "tcp" && p.protocol != "udp" {
            return Err(bad(field, format!("protocol {:?}: tcp or udp", p.protocol)));
        }
        if !pm.allows(&p.protocol, p.host_port) {
            return Err(bad(
                field,
                format!(
                    "host port {}/{} is outside the allowed ranges ([cvm.port_mapping] range)",
                    p.host_port, p.protocol
                ),
            ));
        }
        if p.vm_port == 0 || p.vm_port > 65535 {
            return Err(bad(field, format!("vm_port {} is not a port", p.vm_port)));
        }
        if !p.host_address.is_empty() && p.host_address.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(
                field,
                format!("host_address {:?} is not an IP address", p.host_address),
            ));
        }
        if ports[..i]
            .iter()
            .any(|q| q.protocol == p.protocol && q.host_port == p.host_port)
        {
            return Err(bad(
                field,
                format!("host port {}/{} mapped twice", p.host_port, p.protocol),
            ));
        }
    }
    Ok(())
}

/// A host port may be mapped by one VM only.
pub fn port_conflicts<'a>(
    id: &str,
    ports: &[PortMapping],
    others: impl Iterator<Item = (&'a String, &'a Vec<PortMapping>)>,
) -> Result<(), ValidationError> {
    for (other_id, other_ports) in others {
        if other_id == id {
            continue;
        }
        for (i, p) in ports.iter().enumerate() {
            if other_ports
                .iter()
                .any(|q| q.protocol == p.protocol && q.host_port == p.host_port)
            {
                return Err(bad(
                    format!("ports[{i}]"),
                    format!(
                        "host port {}/{} is already mapped by VM {other_id}",
                        p.host_port, p.protocol
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The network mode a VM runs with: its own `networking.mode`, else the configured default.
pub fn network_mode<'a>(cfg: &'a VmmConfig, req: &'a VmConfiguration) -> &'a str {
    req.networking
        .iter()
        .chain(&req.networks)
        .map(|n| n.mode.as_str())
        .find(|m| !m.is_empty())
        .unwrap_or(&cfg.cvm.networking.mode)
}

/// `networking` / `networks`: one interface, `user` or `bridge` (the managed bridge only), and port
/// mappings only with `user`.
pub fn networking(cfg: &VmmConfig, req: &VmConfiguration) -> Result<(), ValidationError> {
    if req.networks.len() > 1 || (req.networking.is_some() && !req.networks.is_empty()) {
        return Err(bad("networks", "one network interface per VM is supported"));
    }
    let bridge = cfg.cvm.networking.bridge.as_ref();
    for (field, n) in req.networking.iter().map(|n| ("networking".to_owned(), n)).chain(
        req.networks
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("networks[{i}]"), n)),
    ) {
        match (n.mode.as_str(), bridge) {
            ("" | "user", _) => {}
            ("bridge", Some(b)) => {
                if !(n.bridge_name.is_empty() || n.bridge_name == b.name) {
                    return Err(bad(
                        field,
                        format!(
                            "bridge {:?}: only the managed bridge {:?} is available",
                            n.bridge_name, b.name
                        ),
                    ));
                }
            }
            ("bridge", None) => {
                return Err(bad(
                    field,
                    "bridge networking is not configured on this host (vmm.toml [cvm.networking.bridge])",
                ));
            }
            (other, _) => return Err(bad(field, format!("mode {other:?}: \"user\" or \"bridge\""))),
        }
    }
    if network_mode(cfg, req) == "bridge" && !req.ports.is_empty() {
        return Err(bad(
            "ports",
            "port mapping is only available with user networking (this VM uses the bridge)",
        ));
    }
    Ok(())
}

/// The whole `CreateVm` request; returns the image it names.
pub fn vm_configuration(cfg: &VmmConfig, req: &VmConfiguration) -> Result<Image, ValidationError> {
    name(&req.name)?;
    compose(&req.compose_file)?;
    resources(cfg, req.vcpu, req.memory, req.disk_size)?;
    ports(cfg, &req.ports)?;
    if req.encrypted_env.len() > MAX_ENCRYPTED_ENV {
        return Err(bad(
            "encrypted_env",
            format!("{} bytes; at most {MAX_ENCRYPTED_ENV}", req.encrypted_env.len()),
        ));
    }
    if req.user_config.len() > MAX_USER_CONFIG {
        return Err(bad(
            "user_config",
            format!("{} bytes; at most {MAX_USER_CONFIG}", req.user_config.len()),
        ));
    }
    if let Some(app_id) = &req.app_id
        && (app_id.len() != 40 || hex::decode(app_id).is_err())
    {
        return Err(bad("app_id", format!("{app_id:?}: 40 hex digits (20 bytes)")));
    }
    if req
        .gpus
        .as_ref()
        .is_some_and(|g| !g.gpus.is_empty() || g.attach_mode == "all")
    {
        return Err(bad(
            "gpus",
            "GPU passthrough is not available on this host (no VFIO devices)",
        ));
    }
    if req.hugepages {
        return Err(bad("hugepages", "not supported by this VMM"));
    }
    networking(cfg, req)?;
    for (field, urls) in [("kms_urls", &req.kms_urls), ("gateway_urls", &req.gateway_urls)] {
        if let Some(u) = urls
            .iter()
            .find(|u| !(u.starts_with("https://") || u.starts_with("http://")))
        {
            return Err(bad(field, format!("{u:?} is not an http(s) URL")));
        }
    }
    Image::load(&cfg.image.path, &req.image).map_err(|e| bad("image", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("my-app_1.0").is_ok());
        for n in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(name(n).is_err(), "{n:?}");
        }
    }

    #[test]
    fn networking_modes() {
        use dstack_rpc::vmm::NetworkingConfig;
        let mut cfg = VmmConfig::default();
        let vm = |mode: &str, bridge: &str, ports: usize| VmConfiguration {
            networking: Some(NetworkingConfig {
                mode: mode.into(),
                bridge_name: bridge.into(),
            }),
            ports: vec![
                PortMapping {
                    protocol: "tcp".into(),
                    host_port: 8080,
                    vm_port: 80,
                    host_address: String::new(),
                };
                ports
            ],
            ..Default::default()
        };
        assert!(networking(&cfg, &vm("user", "", 1)).is_ok());
        let e = networking(&cfg, &vm("bridge", "", 0)).unwrap_err().to_string();
        assert!(e.contains("not configured"), "{e}");
        cfg.cvm.networking.bridge = Some(Default::default());
        assert!(networking(&cfg, &vm("bridge", "", 0)).is_ok());
        assert!(networking(&cfg, &vm("bridge", "dstackbr0", 0)).is_ok());
        let e = networking(&cfg, &vm("bridge", "virbr0", 0)).unwrap_err().to_string();
        assert!(e.contains("only the managed bridge"), "{e}");
        let e = networking(&cfg, &vm("bridge", "", 1)).unwrap_err().to_string();
        assert!(e.contains("ports") && e.contains("user networking"), "{e}");
        let e = networking(&cfg, &vm("tap", "", 0)).unwrap_err().to_string();
        assert!(e.contains("\"tap\""), "{e}");
        // The configured default applies to VMs that do not ask.
        cfg.cvm.networking.mode = "bridge".into();
        let plain = VmConfiguration::default();
        assert_eq!(network_mode(&cfg, &plain), "bridge");
        assert_eq!(network_mode(&cfg, &vm("user", "", 0)), "user");
    }

    #[test]
    fn port_rules() {
        let cfg = VmmConfig::default();
        let p = |proto: &str, host: u32, vm: u32| PortMapping {
            protocol: proto.into(),
            host_port: host,
            vm_port: vm,
            host_address: String::new(),
        };
        assert!(ports(&cfg, &[p("tcp", 8080, 80), p("udp", 8080, 80)]).is_ok());
        for (list, needle) in [
            (vec![p("tcp", 30000, 80)], "outside"),
            (vec![p("sctp", 80, 80)], "protocol"),
            (vec![p("tcp", 80, 70000)], "vm_port"),
            (vec![p("tcp", 80, 80), p("tcp", 80, 81)], "twice"),
        ] {
            let e = ports(&cfg, &list).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let theirs = vec![p("tcp", 8080, 1)];
        let other = "other".to_owned();
        let e = port_conflicts("me", &[p("tcp", 8080, 80)], [(&other, &theirs)].into_iter()).unwrap_err();
        assert!(e.to_string().contains("already mapped by VM other"), "{e}");
    }
}
