//! virtio-blk (§5.2) on a raw image file: read, write (refused on read-only disks), flush and get-id.
//! Every request is bounds-checked against the disk size; malformed chains — including buffers outside the
//! memory the device may access, e.g. a TD's private memory — complete with an error status (or with nothing
//! used, when there is not even an accessible status byte to write) and never panic.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{ActivateContext, TYPE_BLOCK, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError, Worker, notify_used};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Feature bits.
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
/// Length of the serial returned by GET_ID.
pub const ID_BYTES: usize = 20;
/// Bytes moved per host I/O call.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {len} bytes, not a whole number of 512-byte sectors")]
    Unaligned { path: PathBuf, len: u64 },
}

/// The backing file and what the guest is told about it.
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens `path` (read-write unless `read_only`). The serial is the file name, truncated to 20 bytes.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        if len % SECTOR_SIZE != 0 {
            return Err(BlockError::Unaligned {
                path: path.to_owned(),
                len,
            });
        }
        let mut id = [0u8; ID_BYTES];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Self {
            file,
            sectors: len / SECTOR_SIZE,
            read_only,
            id,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The byte range `[sector * 512, + len)` if it lies inside the disk and `len` is whole sectors.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = u64::try_from(len).ok()?;
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        (len % SECTOR_SIZE == 0 && end <= self.sectors * SECTOR_SIZE).then_some(start)
    }

    /// Executes one request; returns the number of bytes written into the chain's device-writable part
    /// (including the status byte), which is the used length.
    pub fn process(&self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let head = chain.head_index();
        if !readable_then_writable(&chain) {
            tracing::warn!("virtio-blk: request (head {head}) has a readable descriptor after a writable one");
            return 0;
        }
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("virtio-blk: malformed descriptor chain (head {head}): {e}");
                return fail_request(&chain, mem);
            }
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            tracing::warn!("virtio-blk: request (head {head}) has no device-writable status byte");
            return 0;
        }
        let mut status_writer = match writer.split_at(writable - 1) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("virtio-blk: splitting off the status byte (head {head}): {e}");
                return 0;
            }
        };
        let mut header = [0u8; 16];
        let (status, data_written) = if reader.read_exact(&mut header).is_err() {
            tracing::warn!("virtio-blk: request (head {head}) has a header shorter than 16 bytes");
            (S_IOERR, 0)
        } else {
            let ty = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector_bytes = [0u8; 8];
            sector_bytes.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector_bytes);
            self.execute(ty, sector, &mut reader, &mut writer)
        };
        if let Err(e) = status_writer.write_all(&[status]) {
            tracing::warn!("virtio-blk: writing the status byte (head {head}): {e}");
            return data_written;
        }
        data_written + 1
    }

    fn execute(
        &self,
        ty: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> (u8, u32) {
        match ty {
            T_IN => {
                let len = writer.available_bytes();
                let Some(mut off) = self.range(sector, len) else {
                    tracing::debug!("virtio-blk: read of {len} bytes at sector {sector} is out of range");
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let Some(chunk) = buf.get_mut(..n) else { break };
                    if let Err(e) = self.file.read_exact_at(chunk, off) {
                        tracing::warn!("virtio-blk: reading the image at {off:#x}: {e}");
                        return (S_IOERR, done as u32);
                    }
                    if writer.write_all(chunk).is_err() {
                        return (S_IOERR, done as u32);
                    }
                    done += n;
                    off += n as u64;
                }
                (S_OK, done as u32)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Some(mut off) = self.range(sector, len) else {
                    tracing::debug!("virtio-blk: write of {len} bytes at sector {sector} is out of range");
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let Some(chunk) = buf.get_mut(..n) else { break };
                    if reader.read_exact(chunk).is_err() {
                        return (S_IOERR, 0);
                    }
                    if let Err(e) = self.file.write_all_at(chunk, off) {
                        tracing::warn!("virtio-blk: writing the image at {off:#x}: {e}");
                        return (S_IOERR, 0);
                    }
                    done += n;
                    off += n as u64;
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                match self.id.get(..n).map(|id| writer.write_all(id)) {
                    Some(Ok(())) => (S_OK, n as u32),
                    _ => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

/// A request whose buffers cannot all be accessed: writes `S_IOERR` into the status byte (the last byte of the
/// last descriptor, if device-writable and accessible) and returns the used length (1, or 0 without one).
fn fail_request(chain: &DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    let Some(last) = chain.clone().last() else {
        return 0;
    };
    if !last.is_write_only() || last.len() == 0 {
        return 0;
    }
    let Some(at) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        return 0;
    };
    match mem.write_obj(S_IOERR, GuestAddress(at)) {
        Ok(()) => 1,
        Err(e) => {
            tracing::warn!("virtio-blk: cannot write the error status at {at:#x}: {e}");
            0
        }
    }
}

/// Whether all device-readable descriptors of `chain` precede the device-writable ones (§2.7.4.2).
pub fn readable_then_writable(chain: &DescriptorChain<&GuestMemoryMmap>) -> bool {
    let mut seen_writable = false;
    for d in chain.clone() {
        if d.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return false;
        }
    }
    true
}

/// Serves every available request of `queue`; returns how many were completed.
pub fn process_queue(disk: &Disk, queue: &mut Queue, mem: &GuestMemoryMmap) -> usize {
    let mut done = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let used = disk.process(chain, mem);
        if let Err(e) = queue.add_used(mem, head, used) {
            tracing::warn!("virtio-blk: add_used: {e}");
        }
        done += 1;
    }
    done
}

pub struct Block {
    disk: Arc<Disk>,
    worker: Option<Worker>,
}

impl Block {
    pub fn new(disk: Disk) -> Self {
        Self {
            disk: Arc::new(disk),
            worker: None,
        }
    }

    /// `struct virtio_blk_config` up to `blk_size`: capacity (sectors), size_max, seg_max, geometry, blk_size.
    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_SEG_MAX | F_FLUSH | if self.disk.read_only { F_RO } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        let ActivateContext {
            mem,
            mut queues,
            queue_events,
            interrupt,
            ..
        } = ctx;
        if queues.len() != 1 {
            return Err(VirtioError::QueueCount {
                want: 1,
                got: queues.len(),
            });
        }
        let disk = self.disk.clone();
        self.worker = Some(Worker::spawn("virtio-blk", move |kill| {
            super::run_queue_loop("virtio-blk", &kill, &queue_events, |_| {
                let Some(m) = super::pass_memory("virtio-blk", mem.as_ref(), &queues, interrupt.as_ref()) else {
                    return;
                };
                if let Some(q) = queues.first_mut()
                    && process_queue(&disk, q, &m) > 0
                {
                    notify_used(q, &m, interrupt.as_ref(), 0);
                }
            });
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
