//! Explicit TEE selection.
//!
//! Grammar of the selector (config value, or the kernel command line parameter `dstack.tee=`):
//! `auto` (TDX if present, else fail), `tdx` (TDX or fail), `simulated:vsock:<cid>:<port>` or
//! `simulated:unix:<path>` (the simulated TDX module; refused on a machine that has TDX, so a host cannot
//! downgrade a real TD to simulated evidence), `agent:<socket path>` (the dstack guest agent, e.g.
//! `agent:/var/run/dstack.sock` in an app container of a CVM; its kind comes from its quotes, and simulated
//! evidence from it is refused where TDX is present, for the same reason).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::tdx::{TdxGuest, TdxPaths};
use crate::{AGENT_CONNECT_WAIT, AgentTee, SimulatedTee, TdxTee, Tee, TeeError, TeeKind};

/// Kernel command line parameter naming the TEE.
pub const CMDLINE_PARAM: &str = "dstack.tee";

/// Where the simulated TDX module listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEndpoint {
    /// AF_VSOCK (CID 2 = the host).
    Vsock { cid: u32, port: u32 },
    /// A unix socket (tests, or a host-side process).
    Unix(PathBuf),
}

impl fmt::Display for SimEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TeeRequest {
    /// TDX if present, otherwise no TEE.
    #[default]
    Auto,
    /// TDX, required.
    Tdx,
    /// The simulated TDX module at this endpoint.
    Simulated(SimEndpoint),
    /// The dstack guest agent on this unix socket.
    Agent(PathBuf),
}

impl TeeRequest {
    /// Parses a selector (see the module docs).
    pub fn parse(s: &str) -> Result<Self, TeeError> {
        let bad = |why: &str| TeeError::InvalidArgument(format!("TEE selector {s:?}: {why}"));
        match s {
            "auto" | "" => return Ok(Self::Auto),
            "tdx" => return Ok(Self::Tdx),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("agent:") {
            if path.is_empty() {
                return Err(bad("expected agent:<socket path>"));
            }
            return Ok(Self::Agent(path.into()));
        }
        let rest = s.strip_prefix("simulated:").ok_or_else(|| {
            bad("expected auto, tdx, simulated:vsock:<cid>:<port>, simulated:unix:<path> or agent:<socket path>")
        })?;
        if let Some(addr) = rest.strip_prefix("vsock:") {
            let (cid, port) = addr.split_once(':').ok_or_else(|| bad("expected vsock:<cid>:<port>"))?;
            let cid = cid.parse().map_err(|_| bad("CID is not a number"))?;
            let port = port.parse().map_err(|_| bad("port is not a number"))?;
            return Ok(Self::Simulated(SimEndpoint::Vsock { cid, port }));
        }
        if let Some(path) = rest.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Self::Simulated(SimEndpoint::Unix(path.into())));
        }
        Err(bad("simulated endpoint must be vsock:<cid>:<port> or unix:<path>"))
    }

    /// The selector from a kernel command line (`dstack.tee=…`; the last one wins, absent = auto).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, TeeError> {
        let prefix = format!("{CMDLINE_PARAM}=");
        match cmdline
            .split_ascii_whitespace()
            .rev()
            .find_map(|w| w.strip_prefix(&prefix))
        {
            Some(v) => Self::parse(v),
            None => Ok(Self::Auto),
        }
    }
}

/// Inputs of [`detect`].
#[derive(Debug, Clone)]
pub struct TeeConfig {
    /// Where the TDX guest interfaces are.
    pub tdx_paths: TdxPaths,
    /// What was asked for.
    pub request: TeeRequest,
}

impl TeeConfig {
    /// Real paths, selector from `/proc/cmdline`.
    pub fn system() -> Result<Self, TeeError> {
        let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|source| TeeError::Io {
            what: "reading /proc/cmdline".into(),
            source,
        })?;
        Ok(Self {
            tdx_paths: TdxPaths::system(),
            request: TeeRequest::from_cmdline(&cmdline)?,
        })
    }
}

/// Picks the backend `config` asks for, failing closed when it is not there.
pub fn detect(config: &TeeConfig) -> Result<Arc<dyn Tee>, TeeError> {
    let tdx_present = TdxGuest::present(&config.tdx_paths);
    match (&config.request, tdx_present) {
        (TeeRequest::Auto | TeeRequest::Tdx, true) => Ok(Arc::new(TdxTee::new(config.tdx_paths.clone()))),
        (TeeRequest::Simulated(ep), true) => Err(TeeError::InvalidArgument(format!(
            "a simulated TEE ({ep}) was requested but this machine has TDX ({}); refusing to use simulated evidence \
             on a real TD",
            config.tdx_paths.device.display()
        ))),
        (TeeRequest::Simulated(ep), false) => Ok(Arc::new(SimulatedTee::new(ep))),
        (TeeRequest::Agent(socket), _) => {
            let tee = AgentTee::connect_blocking(socket, AGENT_CONNECT_WAIT)?;
            if tdx_present && tee.kind() == TeeKind::Simulated {
                return Err(TeeError::InvalidArgument(format!(
                    "the guest agent at {} returns simulated quotes but this machine has TDX ({}); refusing to use \
                     simulated evidence on a real TD",
                    socket.display(),
                    config.tdx_paths.device.display()
                )));
            }
            Ok(Arc::new(tee))
        }
        (TeeRequest::Auto | TeeRequest::Tdx, false) => Err(TeeError::NoTee(format!(
            "{} and {} are missing and no simulated TEE is configured ({CMDLINE_PARAM}=simulated:vsock:2:<port>)",
            config.tdx_paths.device.display(),
            config.tdx_paths.measurements.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TeeKind;

    #[test]
    fn selectors_parse() {
        assert_eq!(TeeRequest::parse("auto").unwrap(), TeeRequest::Auto);
        assert_eq!(TeeRequest::parse("tdx").unwrap(), TeeRequest::Tdx);
        assert_eq!(
            TeeRequest::parse("simulated:vsock:2:4050").unwrap(),
            TeeRequest::Simulated(SimEndpoint::Vsock { cid: 2, port: 4050 })
        );
        assert_eq!(
            TeeRequest::parse("simulated:unix:/run/sim.sock").unwrap(),
            TeeRequest::Simulated(SimEndpoint::Unix("/run/sim.sock".into()))
        );
        assert_eq!(
            TeeRequest::parse("agent:/var/run/dstack.sock").unwrap(),
            TeeRequest::Agent("/var/run/dstack.sock".into())
        );
        for bad in [
            "sim",
            "simulated",
            "simulated:vsock:2",
            "simulated:vsock:x:1",
            "simulated:unix:",
            "agent:",
            "agent",
            "TDX",
        ] {
            assert!(
                matches!(TeeRequest::parse(bad), Err(TeeError::InvalidArgument(_))),
                "{bad}"
            );
        }
        assert_eq!(
            TeeRequest::from_cmdline("console=ttyS0 dstack.tee=simulated:vsock:2:9 quiet").unwrap(),
            TeeRequest::Simulated(SimEndpoint::Vsock { cid: 2, port: 9 })
        );
        assert_eq!(TeeRequest::from_cmdline("console=ttyS0").unwrap(), TeeRequest::Auto);
        assert!(TeeRequest::from_cmdline("dstack.tee=bogus").is_err());
    }

    fn config(request: TeeRequest, with_tdx: bool) -> (tempfile::TempDir, TeeConfig) {
        let dir = tempfile::tempdir().unwrap();
        let tdx_paths = TdxPaths::under(dir.path());
        if with_tdx {
            std::fs::create_dir_all(&tdx_paths.measurements).unwrap();
        }
        (dir, TeeConfig { tdx_paths, request })
    }

    #[test]
    fn detection_is_explicit_and_fails_closed() {
        let sim = TeeRequest::Simulated(SimEndpoint::Vsock { cid: 2, port: 1 });
        let (_d, c) = config(TeeRequest::Auto, false);
        let err = detect(&c).unwrap_err();
        assert!(
            matches!(err, TeeError::NoTee(_)) && err.to_string().contains("dstack.tee="),
            "{err}"
        );
        let (_d, c) = config(TeeRequest::Tdx, false);
        assert!(matches!(detect(&c), Err(TeeError::NoTee(_))));
        let (_d, c) = config(TeeRequest::Auto, true);
        assert_eq!(detect(&c).unwrap().kind(), TeeKind::Tdx);
        let (_d, c) = config(sim.clone(), false);
        assert_eq!(detect(&c).unwrap().kind(), TeeKind::Simulated);
        let (_d, c) = config(sim, true);
        assert!(matches!(detect(&c), Err(TeeError::InvalidArgument(_))));
    }
}
