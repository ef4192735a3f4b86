//! AES-256-GCM envelope encryption of object payloads.
//!
//! Every object is sealed under its own random data key and nonce; the data key is
//! wrapped (AES-256-GCM again) by a master key and kept in the object's envelope with the
//! master key's id. The payload's associated data binds it to its header and content id,
//! and the wrap's binds the data key to the object id, so a body or an envelope moved to
//! another object fails authentication. Rotating the master key only rewraps envelopes.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use sha2::{Digest, Sha256};

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const KEY_ID_LEN: usize = 8;
/// Envelope layout: key id (8), wrap nonce (12), wrapped data key (32 + 16 tag), payload
/// nonce (12).
pub const ENVELOPE_LEN: usize = KEY_ID_LEN + NONCE_LEN + KEY_LEN + TAG_LEN + NONCE_LEN;

/// The id of a master key: the first 8 bytes of a hash of it (names the key, reveals
/// nothing usable about it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<KeyId> {
        let mut id = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(KeyId(id))
    }
    /// As stored in the database (a signed 64-bit integer).
    pub fn as_i64(&self) -> i64 {
        i64::from_le_bytes(self.0)
    }
    pub fn from_i64(v: i64) -> KeyId {
        KeyId(v.to_le_bytes())
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

/// Sealing failed: AES-GCM refused the message (only beyond its 64 GiB limit, which
/// objects never reach as they are bounded far below it). Nothing sealed may be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AES-256-GCM sealing failed (message of {0} bytes refused)")]
pub struct SealError(pub usize);

/// The tag of a seal, or the error that stops the object from being written: never a
/// zero tag in its place.
fn sealed_tag(r: Result<Tag, aws_lc_rs::error::Unspecified>, len: usize) -> Result<[u8; TAG_LEN], SealError> {
    let tag = r.map_err(|_| SealError(len))?;
    <[u8; TAG_LEN]>::try_from(tag.as_ref()).map_err(|_| SealError(len))
}

/// Random bytes from the operating system. Failing to get them is not something to
/// continue from: no key or nonce may ever be predictable.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Err(e) = getrandom::fill(&mut b) {
        // The kernel's random source is always there on Linux; without it nothing is safe.
        panic!("the operating system's random number source failed: {e}");
    }
    b
}

/// AES-256-GCM under `key` (aws-lc-rs: AES-NI/VAES and carry-less multiplication; the
/// RustCrypto implementation measured 1.1 GB/s per core here, which cost a quarter of a
/// backup's throughput).
fn cipher(key: &[u8; KEY_LEN]) -> LessSafeKey {
    // A 32-byte key is always a valid AES-256 key.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap_or_else(|_| unreachable!("32-byte AES-256 key")))
}

fn nonce(n: &[u8]) -> Nonce {
    let mut a = [0u8; NONCE_LEN];
    a.copy_from_slice(&n[..NONCE_LEN]);
    Nonce::assume_unique_for_key(a)
}

/// A master key: wraps data keys (and the repository secret in the keyring).
pub struct MasterKey {
    id: KeyId,
    cipher: LessSafeKey,
}

impl MasterKey {
    pub fn new(key: &[u8; KEY_LEN]) -> MasterKey {
        let digest = Sha256::new().chain_update(b"keepfs master key id\0").chain_update(key).finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        MasterKey { id: KeyId(id), cipher: cipher(key) }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Seals a short secret: returns nonce and ciphertext with its tag.
    pub fn wrap(&self, secret: &[u8], aad: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>), SealError> {
        let n = random::<NONCE_LEN>();
        let mut buf = secret.to_vec();
        let tag = sealed_tag(self.cipher.seal_in_place_separate_tag(nonce(&n), Aad::from(aad), &mut buf), buf.len())?;
        buf.extend_from_slice(&tag);
        Ok((n, buf))
    }

    /// Opens what [`MasterKey::wrap`] sealed; `None` when it does not authenticate.
    pub fn unwrap(&self, nonce: &[u8], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if nonce.len() != NONCE_LEN || sealed.len() < TAG_LEN {
            return None;
        }
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut out = vec![0u8; body.len()];
        self.cipher.open_separate_gather(self::nonce(nonce), Aad::from(aad), body, tag, &mut out).ok().map(|_| out)
    }
}

/// Why a sealed payload could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The envelope names a master key that is not at hand.
    UnknownKey(KeyId),
    /// The wrapped data key does not authenticate under its master key.
    DataKey,
    /// The payload does not authenticate under its data key and header.
    Payload,
    /// Sealing the rewrapped data key failed.
    Seal(SealError),
    /// The envelope has the wrong length.
    Envelope,
}

fn wrap_aad(key: KeyId, object_id: &[u8; 32]) -> [u8; 9 + KEY_ID_LEN + 32] {
    let mut aad = [0u8; 9 + KEY_ID_LEN + 32];
    aad[..9].copy_from_slice(b"keepfs-dk");
    aad[9..9 + KEY_ID_LEN].copy_from_slice(&key.0);
    aad[9 + KEY_ID_LEN..].copy_from_slice(object_id);
    aad
}

/// Encrypts `payload` in place under a fresh data key wrapped by `master`; returns the
/// envelope for the object's header and the tag that follows the ciphertext. A seal
/// that fails is an error (the object must not be written), never a zero tag.
pub fn seal(
    master: &MasterKey,
    object_id: &[u8; 32],
    aad: &[u8],
    payload: &mut [u8],
) -> Result<([u8; ENVELOPE_LEN], [u8; TAG_LEN]), SealError> {
    let data_key = random::<KEY_LEN>();
    let n = random::<NONCE_LEN>();
    let len = payload.len();
    let t = sealed_tag(cipher(&data_key).seal_in_place_separate_tag(nonce(&n), Aad::from(aad), payload), len)?;
    let mut env = [0u8; ENVELOPE_LEN];
    env[ENVELOPE_LEN - NONCE_LEN..].copy_from_slice(&n);
    wrap_into(&mut env, master, &data_key, object_id)?;
    Ok((env, t))
}

/// Writes the key id, wrap nonce and the data key wrapped by `master` into `env` (the
/// payload nonce at its end stays).
fn wrap_into(
    env: &mut [u8; ENVELOPE_LEN],
    master: &MasterKey,
    data_key: &[u8; KEY_LEN],
    object_id: &[u8; 32],
) -> Result<(), SealError> {
    let (wrap_nonce, wrapped) = master.wrap(data_key, &wrap_aad(master.id(), object_id))?;
    env[..KEY_ID_LEN].copy_from_slice(&master.id().0);
    env[KEY_ID_LEN..KEY_ID_LEN + NONCE_LEN].copy_from_slice(&wrap_nonce);
    env[KEY_ID_LEN + NONCE_LEN..KEY_ID_LEN + NONCE_LEN + KEY_LEN + TAG_LEN].copy_from_slice(&wrapped);
    Ok(())
}

/// The master key id an envelope names.
pub fn envelope_key(envelope: &[u8]) -> Option<KeyId> {
    (envelope.len() == ENVELOPE_LEN).then(|| {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&envelope[..KEY_ID_LEN]);
        KeyId(id)
    })
}

fn data_key<'a>(
    find: impl Fn(KeyId) -> Option<&'a MasterKey>,
    envelope: &[u8],
    object_id: &[u8; 32],
) -> Result<[u8; KEY_LEN], OpenError> {
    let key = envelope_key(envelope).ok_or(OpenError::Envelope)?;
    let master = find(key).ok_or(OpenError::UnknownKey(key))?;
    let wrapped = &envelope[KEY_ID_LEN + NONCE_LEN..KEY_ID_LEN + NONCE_LEN + KEY_LEN + TAG_LEN];
    let dk = master
        .unwrap(&envelope[KEY_ID_LEN..KEY_ID_LEN + NONCE_LEN], wrapped, &wrap_aad(key, object_id))
        .ok_or(OpenError::DataKey)?;
    <[u8; KEY_LEN]>::try_from(dk.as_slice()).map_err(|_| OpenError::DataKey)
}

/// Decrypts a sealed payload (`ciphertext`, then the 16-byte `tag` that follows it in
/// the object) into `out`, which must be as long as the ciphertext.
pub fn open<'a>(
    find: impl Fn(KeyId) -> Option<&'a MasterKey>,
    envelope: &[u8],
    object_id: &[u8; 32],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
    out: &mut [u8],
) -> Result<(), OpenError> {
    let dk = data_key(find, envelope, object_id)?;
    if tag.len() != TAG_LEN || out.len() != ciphertext.len() {
        return Err(OpenError::Payload);
    }
    cipher(&dk)
        .open_separate_gather(nonce(&envelope[ENVELOPE_LEN - NONCE_LEN..]), Aad::from(aad), ciphertext, tag, out)
        .map_err(|_| OpenError::Payload)
}

/// The same envelope with its data key wrapped by `new` instead (key rotation): the
/// payload and its nonce stay as they are.
pub fn rewrap<'a>(
    find: impl Fn(KeyId) -> Option<&'a MasterKey>,
    new: &MasterKey,
    envelope: &[u8],
    object_id: &[u8; 32],
) -> Result<[u8; ENVELOPE_LEN], OpenError> {
    let dk = data_key(find, envelope, object_id)?;
    let mut env = [0u8; ENVELOPE_LEN];
    env.copy_from_slice(envelope);
    wrap_into(&mut env, new, &dk, object_id).map_err(OpenError::Seal)?;
    Ok(env)
}

/// An AES-256-GCM context of aws-lc's EVP interface, which takes a message in pieces
/// (aws-lc-rs seals and opens in one pass only, which would hold a large object whole).
/// The bytes are the one-pass seal's: a message sealed in pieces opens in one pass, and
/// the other way round. Freed when dropped.
struct Gcm {
    ctx: *mut aws_lc_sys::EVP_CIPHER_CTX,
    encrypt: bool,
}

// SAFETY: the context is owned by this value alone and is only used through `&mut self`.
unsafe impl Send for Gcm {}

impl Drop for Gcm {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from EVP_CIPHER_CTX_new and is freed once, here.
        unsafe { aws_lc_sys::EVP_CIPHER_CTX_free(self.ctx) }
    }
}

/// Pieces handed to aws-lc at once (its lengths are C ints).
const GCM_PIECE: usize = 1 << 30;

impl Gcm {
    /// A context keyed by `key`, at `nonce`, with `aad` already authenticated; `None` when
    /// aws-lc refuses (out of memory).
    fn new(encrypt: bool, key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], aad: &[u8]) -> Option<Gcm> {
        // SAFETY: a fresh context or null.
        let ctx = unsafe { aws_lc_sys::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return None;
        }
        let mut gcm = Gcm { ctx, encrypt };
        // SAFETY: `ctx` is live; key and nonce are 32 and 12 bytes (GCM's default nonce
        // length is 12, NONCE_LEN), read during the call only.
        let ok = unsafe {
            let cipher = aws_lc_sys::EVP_aes_256_gcm();
            if encrypt {
                aws_lc_sys::EVP_EncryptInit_ex(ctx, cipher, std::ptr::null_mut(), key.as_ptr(), nonce.as_ptr())
            } else {
                aws_lc_sys::EVP_DecryptInit_ex(ctx, cipher, std::ptr::null_mut(), key.as_ptr(), nonce.as_ptr())
            }
        } == 1;
        (ok && aad.chunks(GCM_PIECE).all(|piece| gcm.call(std::ptr::null_mut(), piece.as_ptr(), piece.len())))
            .then_some(gcm)
    }

    /// One EVP update of `len` bytes from `input` to `out` (null: associated data).
    fn call(&mut self, out: *mut u8, input: *const u8, len: usize) -> bool {
        let mut written: std::os::raw::c_int = 0;
        let Ok(n) = std::os::raw::c_int::try_from(len) else { return false };
        // SAFETY: `ctx` is live; `input` is readable and `out` (when not null) writable
        // for `len` bytes, and they are equal or disjoint (GCM allows in-place).
        let rc = unsafe {
            if self.encrypt {
                aws_lc_sys::EVP_EncryptUpdate(self.ctx, out, &mut written, input, n)
            } else {
                aws_lc_sys::EVP_DecryptUpdate(self.ctx, out, &mut written, input, n)
            }
        };
        rc == 1 && (out.is_null() || written == n)
    }

    /// Encrypts or decrypts `buf` in place (GCM is a stream cipher: same length).
    fn update(&mut self, buf: &mut [u8]) -> bool {
        buf.chunks_mut(GCM_PIECE).all(|piece| {
            let p = piece.as_mut_ptr();
            self.call(p, p, piece.len())
        })
    }

    /// The tag of everything sealed.
    fn seal_finish(self) -> Option<[u8; TAG_LEN]> {
        let mut tag = [0u8; TAG_LEN];
        let mut n: std::os::raw::c_int = 0;
        let mut none = [0u8; 16];
        // SAFETY: `ctx` is live; a stream mode writes nothing at its end (room for a block
        // is given anyway); the tag is 16 bytes, as asked.
        let ok = unsafe {
            aws_lc_sys::EVP_EncryptFinal_ex(self.ctx, none.as_mut_ptr(), &mut n) == 1
                && aws_lc_sys::EVP_CIPHER_CTX_ctrl(
                    self.ctx,
                    aws_lc_sys::EVP_CTRL_GCM_GET_TAG,
                    TAG_LEN as std::os::raw::c_int,
                    tag.as_mut_ptr().cast(),
                ) == 1
        };
        (ok && n == 0).then_some(tag)
    }

    /// Whether everything opened authenticates under `tag`.
    fn open_finish(self, tag: &[u8]) -> bool {
        let Ok(tag) = <[u8; TAG_LEN]>::try_from(tag) else { return false };
        let mut tag = tag;
        let mut n: std::os::raw::c_int = 0;
        let mut none = [0u8; 16];
        // SAFETY: as in `seal_finish`; the tag is read during the call only.
        unsafe {
            aws_lc_sys::EVP_CIPHER_CTX_ctrl(
                self.ctx,
                aws_lc_sys::EVP_CTRL_GCM_SET_TAG,
                TAG_LEN as std::os::raw::c_int,
                tag.as_mut_ptr().cast(),
            ) == 1
                && aws_lc_sys::EVP_DecryptFinal_ex(self.ctx, none.as_mut_ptr(), &mut n) == 1
                && n == 0
        }
    }
}

/// A payload sealed as [`seal`] does, handed over in pieces: the envelope is known first,
/// the tag last. Nothing of it may be stored before [`SealStream::finish`] succeeds.
pub struct SealStream {
    gcm: Gcm,
    envelope: [u8; ENVELOPE_LEN],
}

/// Starts sealing a payload under a fresh data key wrapped by `master`, `aad` its
/// associated data (as [`seal`]).
pub fn seal_stream(master: &MasterKey, object_id: &[u8; 32], aad: &[u8]) -> Result<SealStream, SealError> {
    let data_key = random::<KEY_LEN>();
    let n = random::<NONCE_LEN>();
    let gcm = Gcm::new(true, &data_key, &n, aad).ok_or(SealError(0))?;
    let mut envelope = [0u8; ENVELOPE_LEN];
    envelope[ENVELOPE_LEN - NONCE_LEN..].copy_from_slice(&n);
    wrap_into(&mut envelope, master, &data_key, object_id)?;
    Ok(SealStream { gcm, envelope })
}

impl SealStream {
    /// The envelope for the object's header.
    pub fn envelope(&self) -> &[u8; ENVELOPE_LEN] {
        &self.envelope
    }

    /// Encrypts the next piece of the payload in place.
    pub fn seal(&mut self, piece: &mut [u8]) -> Result<(), SealError> {
        if self.gcm.update(piece) { Ok(()) } else { Err(SealError(piece.len())) }
    }

    /// The tag that follows the ciphertext.
    pub fn finish(self) -> Result<[u8; TAG_LEN], SealError> {
        self.gcm.seal_finish().ok_or(SealError(0))
    }
}

/// A sealed payload opened in pieces. What it gives back is not authenticated until
/// [`OpenStream::finish`] accepts the tag: nothing may act on it before.
pub struct OpenStream {
    gcm: Gcm,
}

/// Starts opening a payload sealed under `envelope` (as [`open`]).
pub fn open_stream<'a>(
    find: impl Fn(KeyId) -> Option<&'a MasterKey>,
    envelope: &[u8],
    object_id: &[u8; 32],
    aad: &[u8],
) -> Result<OpenStream, OpenError> {
    let dk = data_key(find, envelope, object_id)?;
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&envelope[ENVELOPE_LEN - NONCE_LEN..]);
    let gcm = Gcm::new(false, &dk, &n, aad).ok_or(OpenError::Payload)?;
    Ok(OpenStream { gcm })
}

impl OpenStream {
    /// Decrypts the next piece of the ciphertext in place (not authenticated yet).
    pub fn open(&mut self, piece: &mut [u8]) -> Result<(), OpenError> {
        if self.gcm.update(piece) { Ok(()) } else { Err(OpenError::Payload) }
    }

    /// Whether all that was opened authenticates under `tag`.
    pub fn finish(self, tag: &[u8]) -> Result<(), OpenError> {
        if self.gcm.open_finish(tag) { Ok(()) } else { Err(OpenError::Payload) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_rewrap() {
        let k1 = MasterKey::new(&[1u8; 32]);
        let k2 = MasterKey::new(&[2u8; 32]);
        assert_ne!(k1.id(), k2.id());
        let id = [9u8; 32];
        let mut buf = b"attack at dawn".to_vec();
        let (env, tag) = seal(&k1, &id, b"hdr", &mut buf).unwrap();
        assert_ne!(&buf[..], b"attack at dawn");
        let find1 = |k: KeyId| (k == k1.id()).then_some(&k1);
        let mut out = vec![0u8; buf.len()];
        assert_eq!(open(find1, &env, &id, b"hdr", &buf, &tag, &mut out), Ok(()));
        assert_eq!(&out[..], b"attack at dawn");
        // Wrong header, wrong object id, a flipped tag bit: all refused.
        assert_eq!(open(find1, &env, &id, b"hdX", &buf, &tag, &mut out), Err(OpenError::Payload));
        assert_eq!(open(find1, &env, &[8u8; 32], b"hdr", &buf, &tag, &mut out), Err(OpenError::DataKey));
        let mut bad_tag = tag;
        bad_tag[15] ^= 1;
        assert_eq!(open(find1, &env, &id, b"hdr", &buf, &bad_tag, &mut out), Err(OpenError::Payload));
        // Rewrapped for k2, it opens with k2 only.
        let env2 = rewrap(find1, &k2, &env, &id).unwrap();
        assert_eq!(envelope_key(&env2), Some(k2.id()));
        assert_eq!(open(find1, &env2, &id, b"hdr", &buf, &tag, &mut out), Err(OpenError::UnknownKey(k2.id())));
        let find2 = |k: KeyId| (k == k2.id()).then_some(&k2);
        assert_eq!(open(find2, &env2, &id, b"hdr", &buf, &tag, &mut out), Ok(()));
    }

    /// AES-GCM refusing a message (it does beyond 64 GiB) is an error, not a zero tag.
    #[test]
    fn a_refused_seal_is_an_error() {
        assert_eq!(sealed_tag(Err(aws_lc_rs::error::Unspecified), 7), Err(SealError(7)));
        let k = MasterKey::new(&[3u8; 32]);
        let (_, sealed) = k.wrap(b"secret", b"aad").unwrap();
        assert_eq!(sealed.len(), 6 + TAG_LEN);
        assert_ne!(&sealed[6..], &[0u8; TAG_LEN], "a real tag");
    }

    /// Sealed in pieces, a payload is what one pass seals (the same key and nonce give
    /// the same bytes and tag), and each opens what the other sealed.
    #[test]
    fn a_payload_sealed_in_pieces_is_the_one_pass_seal() {
        let master = MasterKey::new(&[5u8; 32]);
        let find = |k: KeyId| (k == master.id()).then_some(&master);
        let id = [4u8; 32];
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for cuts in [vec![], vec![1], vec![16, 17, 4096], vec![99_999]] {
            let mut s = seal_stream(&master, &id, b"head").unwrap();
            let mut sealed = plain.clone();
            let mut at = 0;
            for &c in cuts.iter().chain(std::iter::once(&plain.len())) {
                s.seal(&mut sealed[at..c]).unwrap();
                at = c;
            }
            let env = *s.envelope();
            let tag = s.finish().unwrap();
            assert_ne!(sealed, plain);
            // One pass opens it.
            let mut out = vec![0u8; plain.len()];
            assert_eq!(open(find, &env, &id, b"head", &sealed, &tag, &mut out), Ok(()));
            assert_eq!(out, plain);
            // One pass with its key and nonce seals the same bytes and tag.
            let dk = data_key(find, &env, &id).unwrap();
            let mut again = plain.clone();
            let t = cipher(&dk)
                .seal_in_place_separate_tag(nonce(&env[ENVELOPE_LEN - NONCE_LEN..]), Aad::from(b"head"), &mut again)
                .unwrap();
            assert_eq!(again, sealed);
            assert_eq!(t.as_ref(), &tag);
            // Opened in pieces, it authenticates; a flipped bit, another tag or other
            // associated data does not.
            let mut o = open_stream(find, &env, &id, b"head").unwrap();
            let mut opened = sealed.clone();
            let (a, b) = opened.split_at_mut(33_333);
            o.open(a).unwrap();
            o.open(b).unwrap();
            assert_eq!(o.finish(&tag), Ok(()));
            assert_eq!(opened, plain);
            let mut bad = sealed.clone();
            bad[777] ^= 4;
            let mut o = open_stream(find, &env, &id, b"head").unwrap();
            o.open(&mut bad).unwrap();
            assert_eq!(o.finish(&tag), Err(OpenError::Payload));
            let mut o = open_stream(find, &env, &id, b"hea!").unwrap();
            o.open(&mut sealed.clone()).unwrap();
            assert_eq!(o.finish(&tag), Err(OpenError::Payload));
            let mut o = open_stream(find, &env, &id, b"head").unwrap();
            o.open(&mut sealed.clone()).unwrap();
            assert_eq!(o.finish(&tag[..15]), Err(OpenError::Payload));
        }
        // One-pass seal, opened in pieces.
        let mut sealed = plain.clone();
        let (env, tag) = seal(&master, &id, b"x", &mut sealed).unwrap();
        let mut o = open_stream(find, &env, &id, b"x").unwrap();
        for piece in sealed.chunks_mut(10_000) {
            o.open(piece).unwrap();
        }
        assert_eq!(o.finish(&tag), Ok(()));
        assert_eq!(sealed, plain);
    }
}
