//! `dstack-gateway`: runs the SNI proxy (and the ACME certbot when enabled) from `gateway.toml`;
//! with `[core.rpc] enabled`, also the WireGuard data plane (boringtun, tun device `core.wg.interface`)
//! and `RegisterCvm` over RA-TLS; with `[core.admin] enabled`, health, status and metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use dstack_gateway::acme::{AcmeClient, AcmeSettings, Certbot, ChallTestSrv};
use dstack_gateway::admin::AdminState;
use dstack_gateway::attest::{build_verifier, rpc_router, rpc_router_with_sync};
use dstack_gateway::auth_webhook::AuthWebhook;
use dstack_gateway::config::GatewayConfig;
use dstack_gateway::dns::UdpDnsClient;
use dstack_gateway::proxy::tls::{TlsTerminator, protocol_versions};
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::registration::{AdmissionPolicy, Registrar};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::rpc_tls::RpcTls;
use dstack_gateway::sync::{SyncService, Syncer};
use dstack_gateway::wg::{DeviceConfig, WgDevice, decode_key, generate_private_key, public_key_b64};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(version, about = "dstack gateway: SNI proxy, ACME, CVM registration")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "gateway.toml")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// pebble-challtestsrv management address used as the DNS-01 provider (test deployments).
    #[arg(long)]
    challtestsrv: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let mut config = GatewayConfig::load(&args.config)?;
    let proxy_cfg = config.core.proxy.clone();
    let tls = Arc::new(TlsTerminator::new(protocol_versions(&proxy_cfg.tls_versions)?));
    if args.check {
        use std::io::Write;
        // A closed stdout (e.g. piped into `head`) is not an error worth a panic.
        let _ = writeln!(std::io::stdout(), "{config:#?}");
        return Ok(());
    }
    match tls.load_files(&proxy_cfg.cert_chain, &proxy_cfg.cert_key) {
        Ok(()) => info!("loaded certificate {}", proxy_cfg.cert_chain.display()),
        Err(e) => warn!("TLS termination disabled until a certificate exists: {e}"),
    }

    let certbot_cfg = config.core.certbot.clone();
    // Set once registration (and with it the cluster state) is up.
    let cluster: Arc<std::sync::OnceLock<Arc<Registrar>>> = Arc::default();
    if certbot_cfg.enabled {
        let Some(mgmt) = args.challtestsrv else {
            anyhow::bail!("certbot enabled but no DNS-01 provider configured (only --challtestsrv is implemented)");
        };
        let settings = AcmeSettings {
            directory_url: certbot_cfg.acme_url.clone(),
            ca_file: certbot_cfg.acme_ca_file.clone(),
            contacts: certbot_cfg.contacts.clone(),
            credentials_path: certbot_cfg.work_dir.join("acme-account.json"),
            order_timeout: std::time::Duration::from_secs(300),
        };
        let client = AcmeClient::open(settings, Box::new(ChallTestSrv::new(mgmt)))
            .await
            .context("ACME account")?;
        let bot = Certbot {
            client,
            base_domain: proxy_cfg.base_domain.clone(),
            cert_path: proxy_cfg.cert_chain.clone(),
            key_path: proxy_cfg.cert_key.clone(),
            renew_before: certbot_cfg.renew_before_expiration,
        };
        let tls = tls.clone();
        let publish = cluster.clone();
        let domain = proxy_cfg.base_domain.clone();
        tokio::spawn(async move {
            bot.run(certbot_cfg.renew_interval, |chain, key| {
                if let Err(e) = tls.load_files(chain, key) {
                    warn!("reloading renewed certificate: {e}");
                }
                // Share it with the other gateway nodes.
                if let (Some(r), Ok(c), Ok(k)) = (
                    publish.get(),
                    std::fs::read_to_string(chain),
                    std::fs::read_to_string(key),
                ) {
                    r.publish_cert(&domain, c, k);
                }
            })
            .await;
        });
    }

    let table = RoutingTable::new();
    let (registrar, wg) = if config.core.rpc.enabled {
        let (r, w) = start_registration(&mut config, &table, &tls).await?;
        let _ = cluster.set(r.clone());
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    if config.core.recycle.enabled {
        let (table, rc, registrar) = (table.clone(), config.core.recycle.clone(), registrar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(rc.interval).await;
                // With a data plane, handshakes refresh liveness and removed peers leave it.
                let gone = match &registrar {
                    Some(r) => r.recycle(SystemTime::now()).unwrap_or_else(|e| {
                        warn!("recycle: {e}");
                        Vec::new()
                    }),
                    None => table.recycle(SystemTime::now(), rc.timeout),
                };
                if !gone.is_empty() {
                    info!(count = gone.len(), "recycled stale instances");
                }
            }
        });
    }
    let resolver = UdpDnsClient::from_system(proxy_cfg.timeouts.dns_resolve).context("DNS resolver")?;
    let listen = std::net::SocketAddr::new(proxy_cfg.listen_addr, proxy_cfg.listen_port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    info!(%listen, base_domain = %proxy_cfg.base_domain, "proxy listening");
    let state = Arc::new(ProxyState {
        config: proxy_cfg,
        table,
        resolver: Arc::new(resolver),
        tls,
        stats: Stats::default(),
    });
    if config.core.admin.enabled {
        let addr = config.core.admin.address;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding admin {addr}"))?;
        info!(%addr, "admin listening (/health, /status, /metrics)");
        tokio::spawn(dstack_gateway::admin::serve(
            listener,
            AdminState {
                proxy: state.clone(),
                registrar,
                wg,
            },
        ));
    }
    dstack_gateway::proxy::run(listener, state, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

/// The WireGuard device and the `RegisterCvm` server over RA-TLS.
async fn start_registration(
    config: &mut GatewayConfig,
    table: &RoutingTable,
    proxy_tls: &Arc<TlsTerminator>,
) -> anyhow::Result<(Arc<Registrar>, Arc<WgDevice>)> {
    let wgc = &mut config.core.wg;
    // A rotated key, once persisted, replaces the configured one.
    let stored = match &wgc.key_file {
        Some(path) if path.exists() => Some(KeyFile::load(path)?),
        // First start with a key file but no configured key (the CVM appliance: a key in the measured,
        // public config would be no secret): generate one and persist it on the encrypted disk.
        Some(path) if wgc.private_key.is_empty() => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let b64 = |k: &[u8; 32]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k);
            let file = KeyFile {
                current: b64(&generate_private_key()?),
                previous: None,
            };
            file.save(path)?;
            info!(path = %path.display(), "generated the WireGuard key");
            Some(file)
        }
        _ => None,
    };
    anyhow::ensure!(
        !wgc.private_key.is_empty() || stored.is_some(),
        "core.wg.private_key is required with core.rpc.enabled"
    );
    let key = match &stored {
        Some(k) => decode_key(&k.current).context("core.wg.key_file current")?,
        None => decode_key(&wgc.private_key).context("core.wg.private_key")?,
    };
    let public = public_key_b64(&key);
    if stored.is_some() || wgc.public_key.is_empty() {
        wgc.public_key = public;
    } else {
        anyhow::ensure!(
            wgc.public_key == public,
            "core.wg.public_key does not match core.wg.private_key"
        );
    }
    let previous = match stored.as_ref().and_then(|k| k.previous.as_deref()) {
        Some(p) => Some(decode_key(p).context("core.wg.key_file previous")?),
        None => None,
    };
    let dev = WgDevice::start(DeviceConfig {
        ifname: wgc.interface.clone(),
        private_key: previous.unwrap_or(key),
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], wgc.listen_port)),
        address: wgc.ip,
        mtu: 1420,
        routes: Vec::new(),
    })
    .await
    .context("WireGuard device")?;
    if previous.is_some() {
        // Restarted inside a grace period: the device started on the previous key; make the
        // stored current key current and keep the previous one accepted.
        dev.rotate_key(key);
    }
    let wg = Arc::new(dev);
    info!(interface = %wgc.interface, port = wgc.listen_port, "WireGuard up");

    let verifier = build_verifier(&config.core.attestation)?;
    let allowed = &config.core.attestation.allowed_apps;
    let policy = AdmissionPolicy {
        allowed_apps: (!allowed.is_empty()).then(|| allowed.iter().map(|a| a.to_ascii_lowercase()).collect()),
    };
    let rpc = config.core.rpc.clone();
    // Identity (files, self-signed or guest agent), KMS root and revocation list.
    let mut rpc_tls = RpcTls::from_config(&config.core).await.context("core.rpc / core.kms")?;
    let webhook = AuthWebhook::from_config(&config.core.auth)?;
    if let Some(h) = &webhook {
        info!(?h, "registration webhook enabled (fail closed)");
    }
    let registrar = Arc::new(
        Registrar::new(
            Arc::new(config.clone()),
            table.clone(),
            Box::new(rpc_tls.identity(verifier.clone())),
            wg.clone(),
            policy,
        )
        .with_webhook(webhook),
    );
    let sync_cfg = config.core.sync.clone();
    let tls = rpc_tls.server.clone();
    let listener = tokio::net::TcpListener::bind(rpc.address)
        .await
        .with_context(|| format!("binding rpc {}", rpc.address))?;
    info!(address = %rpc.address, "RegisterCvm listening (RA-TLS)");
    let sync = if sync_cfg.enabled {
        // Our RPC certificate must be an RA-TLS certificate of the gateway app for peers to
        // accept it, as theirs must be for us.
        let service = SyncService::new(
            registrar.clone(),
            Box::new(rpc_tls.identity(verifier.clone())),
            &sync_cfg.gateway_app_id,
        )?;
        let client = rpc_tls.sync_client(verifier, &sync_cfg.gateway_app_id)?;
        // Certificates renewed by another node are installed here too.
        let (proxy_cfg, proxy_tls) = (config.core.proxy.clone(), proxy_tls.clone());
        registrar.set_cert_hook(Box::new(move |c| {
            if c.domain != proxy_cfg.base_domain {
                return;
            }
            let written = write_private(&proxy_cfg.cert_key, &c.key_pem)
                .and_then(|()| std::fs::write(&proxy_cfg.cert_chain, &c.chain_pem));
            match written.map_err(|e| e.to_string()).and_then(|()| {
                proxy_tls
                    .load_files(&proxy_cfg.cert_chain, &proxy_cfg.cert_key)
                    .map_err(|e| e.to_string())
            }) {
                Ok(()) => info!(domain = %c.domain, from = c.origin, "installed certificate from peer"),
                Err(e) => warn!("installing certificate from peer: {e}"),
            }
        }));
        Some((service, client))
    } else {
        None
    };
    // Restore before serving or syncing (certificates go through the hook installed above).
    // A state file we cannot read stops the start: deleting it means re-learning from peers.
    let restored = registrar.load_state().context("restoring core.state_dir")?;
    for r in &restored.rejected {
        warn!("restored state: skipped record: {r}");
    }
    let router = match sync {
        Some((service, client)) => {
            let syncer = Syncer::new(registrar.clone(), client);
            info!(node_id = sync_cfg.node_id, peers = ?syncer.targets(), "gateway sync enabled");
            tokio::spawn(syncer.run(sync_cfg.interval));
            Arc::new(rpc_router_with_sync(registrar.clone(), service))
        }
        None => Arc::new(rpc_router(registrar.clone())),
    };
    let wgc = &config.core.wg;
    if !wgc.rotate_interval.is_zero() {
        let Some(path) = wgc.key_file.clone() else {
            anyhow::bail!("core.wg.rotate_interval needs core.wg.key_file to persist rotated keys");
        };
        tokio::spawn(rotate_keys(
            wg.clone(),
            registrar.clone(),
            path,
            wgc.rotate_interval,
            wgc.rotate_grace,
        ));
    }
    // Agent certificate renewal and the KMS revocation list refresher.
    rpc_tls.spawn_background();
    tokio::spawn(async move {
        if let Err(e) = dstack_rpc::serve_tls(listener, tls, router, std::future::pending()).await {
            warn!("rpc server stopped: {e}");
        }
    });
    Ok((registrar, wg))
}

/// `core.wg.key_file`: the current key and, during a grace period, the previous one (base64).
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    current: String,
    previous: Option<String>,
}

impl KeyFile {
    fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        // Write beside, then rename: a crash never leaves a torn key file.
        let tmp = path.with_extension("tmp");
        write_private(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}

/// Write a file readable by its owner only.
fn write_private(path: &std::path::Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data.as_bytes())
}

/// Rotate the gateway's WireGuard key every `interval`: the new key is persisted, made current
/// and announced (RegisterCvm answers and node records carry it; CVMs pick it up when they
/// re-register); the old one keeps working for `grace`, then is retired.
async fn rotate_keys(
    wg: Arc<WgDevice>,
    registrar: Arc<Registrar>,
    path: PathBuf,
    interval: std::time::Duration,
    grace: std::time::Duration,
) {
    let grace = if grace >= interval {
        warn!("core.wg.rotate_grace must be shorter than rotate_interval; using half the interval");
        interval / 2
    } else {
        grace
    };
    loop {
        tokio::time::sleep(interval - grace).await;
        let step = async {
            let new = generate_private_key()?;
            let old = KeyFile::load(&path).ok().map(|k| k.current);
            let b64 = |k: &[u8; 32]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k);
            KeyFile {
                current: b64(&new),
                previous: old,
            }
            .save(&path)?;
            wg.rotate_key(new);
            registrar.set_wg_public_key(public_key_b64(&new));
            anyhow::Ok(b64(&new))
        };
        let Ok(current) = step
            .await
            .inspect_err(|e| warn!("WireGuard key rotation failed: {e:#}"))
        else {
            continue;
        };
        info!(public_key = %registrar.wg_public_key(), "WireGuard key rotated; previous key accepted for {grace:?}");
        tokio::time::sleep(grace).await;
        let left = wg.peers_on_previous_key();
        if !left.is_empty() {
            warn!(
                count = left.len(),
                "retiring the previous WireGuard key; these peers have not re-registered"
            );
        }
        wg.retire_previous_key();
        if let Err(e) = (KeyFile {
            current,
            previous: None,
        })
        .save(&path)
        {
            warn!("persisting retired WireGuard key state: {e:#}");
        }
    }
}
