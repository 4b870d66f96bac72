//! virtio-net backends (design; the device model itself is not written yet). A backend moves whole Ethernet
//! frames; the device strips/adds the 12-byte `virtio_net_hdr_v1` (no offloads negotiated) and feeds RX/TX.
//!
//! - **passt** (user-mode networking, Debian `passt`): a unix stream socket carrying qemu's "stream" framing,
//!   each frame preceded by its length as a 4-byte big-endian integer ([`StreamFramer`]).
//! - **tap** (bridge networking): an `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` device where each read/write is one
//!   frame (the vnet header can then pass through unchanged).

use std::io;
use std::os::fd::RawFd;

/// Largest Ethernet frame we move (64 KiB covers GSO-less jumbo frames; passt's default MTU is 65520).
pub const MAX_FRAME: usize = 65536 + 14;

/// Moves frames between the guest's virtio-net queues and the host network.
pub trait NetBackend: Send {
    /// Fd the device worker polls for readability (frames from the host).
    fn fd(&self) -> RawFd;
    /// Reads one frame into `buf`; `Ok(None)` when no complete frame is available yet.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends one frame (the whole frame or an error; partial sends are buffered by the backend).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("stream frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
}

/// Incremental decoder/encoder of the qemu stream framing used by passt.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
}

impl StreamFramer {
    /// `len` as 4 bytes big endian, then the frame.
    pub fn encode(frame: &[u8]) -> Result<Vec<u8>, FrameError> {
        if frame.len() > MAX_FRAME {
            return Err(FrameError::TooLong(frame.len()));
        }
        let mut out = Vec::with_capacity(4 + frame.len());
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame);
        Ok(out)
    }

    /// Appends bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any. A length above [`MAX_FRAME`] is a protocol error (the stream cannot be
    /// resynchronized; the caller drops the connection).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len_bytes) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_framing_round_trip_and_split_reads() {
        let a = StreamFramer::encode(b"frame-one").unwrap();
        assert_eq!(&a[..4], &[0, 0, 0, 9], "big-endian length prefix");
        let b = StreamFramer::encode(&[0xab; 300]).unwrap();
        let mut wire = a.clone();
        wire.extend_from_slice(&b);
        let mut f = StreamFramer::default();
        // Feed in awkward pieces, as a socket might deliver them.
        for piece in wire.chunks(7) {
            f.push(piece);
        }
        assert_eq!(f.next_frame().unwrap().unwrap(), b"frame-one");
        assert_eq!(f.next_frame().unwrap().unwrap(), vec![0xab; 300]);
        assert_eq!(f.next_frame().unwrap(), None);
        f.push(&[0, 0, 1]);
        assert_eq!(f.next_frame().unwrap(), None, "incomplete length");
        let mut bad = StreamFramer::default();
        bad.push(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(bad.next_frame(), Err(FrameError::TooLong(0xffff_ffff)));
        assert!(StreamFramer::encode(&vec![0; MAX_FRAME + 1]).is_err());
    }
}
