//! The NBD protocol's numbers and wire formats (NetworkBlockDevice/nbd doc/proto.md):
//! the fixed-newstyle handshake, options and their replies, requests, simple and
//! structured replies. Pure encoding and decoding with bounds, so that the parser can be
//! fed arbitrary bytes (see the property test below).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// The metadata context this server offers, and the id it has on every connection.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest payload of one request or read reply.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload read during the handshake (names are at most 4 KiB).
pub const MAX_OPTION: u32 = 64 << 10;

/// The NBD error for an errno.
pub fn nbd_error(errno: Option<i32>) -> u32 {
    match errno {
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => EPERM,
        Some(libc::ENOSPC | libc::EDQUOT) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ENOTSUP) => ENOTSUP,
        _ => EIO,
    }
}

/// A request header (the payload of a write follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

/// Decodes a request header; `None` when the magic is wrong (the connection must end).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    if u32::from_be_bytes(b[0..4].try_into().ok()?) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().ok()?),
        kind: u16::from_be_bytes(b[6..8].try_into().ok()?),
        cookie: u64::from_be_bytes(b[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
        length: u32::from_be_bytes(b[24..28].try_into().ok()?),
    })
}

/// Reads big-endian fields off an option's payload, never past its end.
pub struct Fields<'a>(pub &'a [u8]);

impl<'a> Fields<'a> {
    pub fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_at_checked(2)?;
        self.0 = t;
        Some(u16::from_be_bytes(h.try_into().ok()?))
    }
    pub fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
    /// A string preceded by its 32-bit length.
    pub fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What NBD_OPT_INFO / NBD_OPT_GO ask: an export and the information wanted.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info(data: &[u8]) -> Option<InfoRequest> {
    let mut f = Fields(data);
    let name = f.string()?;
    let n = f.u16()? as usize;
    let mut infos = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        infos.push(f.u16()?);
    }
    f.is_empty().then_some(InfoRequest { name, infos })
}

/// What NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT ask: an export and queries.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta(data: &[u8]) -> Option<MetaRequest> {
    let mut f = Fields(data);
    let name = f.string()?;
    let n = f.u32()? as usize;
    let mut queries = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        queries.push(f.string()?);
    }
    f.is_empty().then_some(MetaRequest { name, queries })
}

/// Whether a metadata query selects `base:allocation`.
pub fn selects_base_allocation(query: &str) -> bool {
    query == BASE_ALLOCATION || query == "base:"
}

/// An option reply: magic, option, type, length, data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk's header; its payload of `len` bytes follows.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for the property tests of this crate.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// The parsers must take any bytes without a panic, and read nothing past what they
    /// were given.
    #[test]
    fn parsers_take_arbitrary_bytes_without_panicking() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200_000 {
            let len = (rng.next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Often make the length fields plausible, so parsing goes deep.
            if round % 2 == 0 && b.len() >= 4 {
                let n = (rng.next() % 8) as u32;
                b[0..4].copy_from_slice(&n.to_be_bytes());
            }
            let _ = parse_info(&b);
            let _ = parse_meta(&b);
            let mut h = [0u8; REQUEST_LEN];
            for (i, x) in h.iter_mut().enumerate() {
                *x = b.get(i).copied().unwrap_or(rng.next() as u8);
            }
            if round % 3 == 0 {
                h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let _ = parse_request(&h);
        }
    }

    #[test]
    fn well_formed_options_and_requests_decode() {
        let mut go = Vec::new();
        go.extend_from_slice(&4u32.to_be_bytes());
        go.extend_from_slice(b"V001");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info(&go), Some(InfoRequest { name: "V001".into(), infos: vec![1, 3] }));
        go.push(0);
        assert_eq!(parse_info(&go), None, "trailing bytes are refused");

        let mut meta = Vec::new();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(b"x");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(parse_meta(&meta), Some(MetaRequest { name: "x".into(), queries: vec![BASE_ALLOCATION.into()] }));

        let mut r = [0u8; REQUEST_LEN];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        r[8..16].copy_from_slice(&7u64.to_be_bytes());
        r[16..24].copy_from_slice(&4096u64.to_be_bytes());
        r[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&r),
            Some(Request { flags: 0, kind: CMD_WRITE, cookie: 7, offset: 4096, length: 512 })
        );
        r[0] ^= 1;
        assert_eq!(parse_request(&r), None, "a bad magic ends the connection");
    }
}
