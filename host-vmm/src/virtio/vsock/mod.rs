//! virtio-vsock (§5.10) in userspace, host side over unix sockets (see [`muxer`]). Queues: 0 = RX (to the
//! guest), 1 = TX (from the guest), 2 = event (never used: we do not migrate).

pub mod muxer;
pub mod packet;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError, Worker, notify_used,
};
use muxer::Muxer;

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be ≥ 3)")]
    BadCid(u64),
    #[error("binding the vsock host socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    worker: Option<Worker>,
}

impl Vsock {
    /// Binds the host socket at `uds_path` now, so host clients can connect before the guest driver is up.
    pub fn new(cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cid));
        }
        let listener = muxer::bind_listener(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        Ok(Self {
            cid,
            uds_path,
            listener,
            worker: None,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        if ctx.queues.len() != 3 {
            return Err(VirtioError::QueueCount {
                want: 3,
                got: ctx.queues.len(),
            });
        }
        let listener = self.listener.try_clone().map_err(VirtioError::EventFd)?;
        let muxer = Muxer::new(self.cid, self.uds_path.clone(), listener);
        self.worker = Some(Worker::spawn("virtio-vsock", move |kill| run(muxer, ctx, &kill))?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker drops the muxer: every connection's host socket closes.
        self.worker = None;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

const KILL: u64 = u64::MAX;
const HOST: u64 = u64::MAX - 1;

/// Keeps the epoll registrations of host sockets in line with what the muxer wants to hear about.
struct HostFds {
    registered: HashMap<RawFd, EventSet>,
}

impl HostFds {
    fn sync(&mut self, epoll: &Epoll, muxer: &Muxer) {
        let mut want: HashMap<RawFd, EventSet> = HashMap::new();
        for (fd, read, write) in muxer.interest() {
            let mut ev = EventSet::empty();
            if read {
                ev |= EventSet::IN;
            }
            if write {
                ev |= EventSet::OUT;
            }
            want.insert(fd, ev);
        }
        for (&fd, &ev) in &want {
            let e = EpollEvent::new(ev, HOST);
            match self.registered.get(&fd) {
                Some(&old) if old == ev => {}
                Some(_) => {
                    if epoll.ctl(ControlOperation::Modify, fd, e).is_err() {
                        // The fd number was closed and reused since: register it afresh.
                        let _ = epoll.ctl(ControlOperation::Add, fd, e);
                    }
                }
                None => {
                    if epoll.ctl(ControlOperation::Add, fd, e).is_err() {
                        let _ = epoll.ctl(ControlOperation::Modify, fd, e);
                    }
                }
            }
        }
        for fd in self.registered.keys() {
            if !want.contains_key(fd) {
                // Fails harmlessly for fds that were closed (the kernel already dropped them).
                let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
            }
        }
        self.registered = want;
    }
}

fn run(mut muxer: Muxer, ctx: ActivateContext, kill: &EventFd) {
    let ActivateContext {
        mem,
        mut queues,
        queue_events,
        interrupt,
        ..
    } = ctx;
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("virtio-vsock: epoll_create: {e}");
            return;
        }
    };
    let mut fds = vec![(kill.as_raw_fd(), KILL)];
    fds.extend(queue_events.iter().enumerate().map(|(i, e)| (e.as_raw_fd(), i as u64)));
    for (fd, token) in fds {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
            tracing::error!("virtio-vsock: epoll_ctl: {e}");
            return;
        }
    }
    let mut host = HostFds {
        registered: HashMap::new(),
    };
    let mut ready = [EpollEvent::default(); 32];
    loop {
        if let Some(m) = super::pass_memory("virtio-vsock", mem.as_ref(), &queues, interrupt.as_ref()) {
            step(&mut muxer, &mut queues, &m, interrupt.as_ref());
        }
        host.sync(&epoll, &muxer);
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio-vsock: epoll_wait: {e}");
                return;
            }
        };
        for ev in ready.iter().take(n) {
            match ev.data() {
                KILL => return,
                HOST => {}
                i => {
                    if let Some(e) = queue_events.get(i as usize) {
                        let _ = e.read();
                    }
                }
            }
        }
    }
}

/// One round of work: host sockets, guest TX, host sockets again (TX may have granted credit or queued
/// replies), then guest RX.
pub fn step(muxer: &mut Muxer, queues: &mut [virtio_queue::Queue], mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
    muxer.poll_host();
    if let Some(tx) = queues.get_mut(TXQ)
        && muxer.process_tx(tx, mem)
    {
        notify_used(tx, mem, interrupt, TXQ as u16);
    }
    muxer.poll_host();
    if let Some(rx) = queues.get_mut(RXQ)
        && muxer.process_rx(rx, mem)
    {
        notify_used(rx, mem, interrupt, RXQ as u16);
    }
}
