//! A bounds-checked little-endian cursor used by every binary parser in this crate.

use thiserror::Error;

/// A structural parse failure: which field, at which absolute offset, and why.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("{field} at offset {offset}: need {need} bytes, only {have} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("{field} at offset {offset}: {reason}")]
    Invalid {
        field: &'static str,
        offset: usize,
        reason: String,
    },
}

impl ParseError {
    /// Shift the reported offset by `base` (for sub-parsers working on a slice).
    pub fn rebase(self, base: usize) -> Self {
        match self {
            ParseError::Truncated {
                field,
                offset,
                need,
                have,
            } => ParseError::Truncated {
                field,
                offset: offset.saturating_add(base),
                need,
                have,
            },
            ParseError::Invalid { field, offset, reason } => ParseError::Invalid {
                field,
                offset: offset.saturating_add(base),
                reason,
            },
        }
    }
}

/// Cursor over an untrusted byte slice. Every read checks bounds and names the field.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Start at `pos` (clamped to the buffer length).
    pub fn at(buf: &'a [u8], pos: usize) -> Self {
        Self {
            buf,
            pos: pos.min(buf.len()),
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ParseError> {
        let have = self.remaining();
        if n > have {
            return Err(ParseError::Truncated {
                field,
                offset: self.pos,
                need: n,
                have,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ParseError> {
        let s = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, ParseError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, ParseError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A length-prefixed size converted to usize, for use with [`Reader::bytes`].
    pub fn len_u32(&mut self, field: &'static str) -> Result<usize, ParseError> {
        Ok(self.u32(field)? as usize)
    }

    pub fn invalid(&self, field: &'static str, offset: usize, reason: impl Into<String>) -> ParseError {
        ParseError::Invalid {
            field,
            offset,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_names_field_and_offset() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16("a").unwrap(), 0x0201);
        let err = r.u32("b").unwrap_err();
        assert_eq!(
            err,
            ParseError::Truncated {
                field: "b",
                offset: 2,
                need: 4,
                have: 1
            }
        );
        assert!(err.to_string().contains("b at offset 2"));
    }

    #[test]
    fn huge_length_does_not_overflow() {
        let mut r = Reader::new(&[0; 8]);
        assert!(r.bytes(usize::MAX, "x").is_err());
        assert_eq!(r.pos(), 0);
    }
}
