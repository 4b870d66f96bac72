//! `dstack-gateway`: runs the SNI proxy (and the ACME certbot when enabled) from `gateway.toml`.
//!
//! Registration over RA-TLS is served once the RA-TLS identity provider is wired in; the
//! library's [`dstack_gateway::registration::Registrar`] already implements the service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use dstack_gateway::acme::{AcmeClient, AcmeSettings, Certbot, ChallTestSrv};
use dstack_gateway::config::GatewayConfig;
use dstack_gateway::dns::UdpDnsClient;
use dstack_gateway::proxy::tls::{TlsTerminator, protocol_versions};
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::routing::RoutingTable;
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
    let config = GatewayConfig::load(&args.config)?;
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
        tokio::spawn(async move {
            bot.run(certbot_cfg.renew_interval, |chain, key| {
                if let Err(e) = tls.load_files(chain, key) {
                    warn!("reloading renewed certificate: {e}");
                }
            })
            .await;
        });
    }

    let table = RoutingTable::new();
    if config.core.recycle.enabled {
        let (table, rc) = (table.clone(), config.core.recycle.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(rc.interval).await;
                let gone = table.recycle(SystemTime::now(), rc.timeout);
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
    dstack_gateway::proxy::run(listener, state, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
