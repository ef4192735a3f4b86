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
}
