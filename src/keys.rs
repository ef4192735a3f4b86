//! Master keys and the keyring of an encrypted storage.
//!
//! A master key is 32 random bytes from a key file (`keepfs key new FILE`) or derived
//! from a passphrase with Argon2id (parameters and salt kept in the keyring). The
//! keyring (the storage object `keyring`, JSON, see docs/format.md) holds one entry per
//! master key: the key bag — the repository secret (the HMAC key of content ids) and the
//! master keys known when the entry was made — sealed by that master key. So the newest
//! key opens objects sealed under older ones, while an older key never learns a newer
//! one. `current` names the key that seals new objects.

use crate::error::{Error, Result};
use crate::transform::aes::{KEY_LEN, KeyId, MasterKey, random};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The storage key of the keyring object.
pub const KEYRING_KEY: &str = "keyring";
pub const KEYRING_FORMAT: &str = "keepfs-keyring";
pub const KEYRING_FORMAT_VERSION: u32 = 1;

/// Where a master key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A key file: 64 hex digits (what `keepfs key new` writes) or 32 raw bytes.
    File(PathBuf),
    /// A passphrase, stretched with Argon2id.
    Passphrase(String),
}

impl KeySource {
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("key file {}", p.display()),
            KeySource::Passphrase(_) => "passphrase".to_string(),
        }
    }
}

/// Argon2id parameters, stored with each passphrase entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kdf {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

impl Kdf {
    fn new() -> Kdf {
        Kdf {
            algorithm: "argon2id".into(),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
            salt: hex::encode(random::<16>()),
        }
    }

    fn derive(&self, passphrase: &str) -> Result<[u8; KEY_LEN]> {
        if self.algorithm != "argon2id" {
            return Err(Error::Invalid(format!("keyring: unknown key derivation '{}'", self.algorithm)));
        }
        let salt = hex::decode(&self.salt).map_err(|_| Error::Invalid("keyring: the KDF salt is not hex".into()))?;
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(KEY_LEN))
            .map_err(|e| Error::Invalid(format!("keyring: bad Argon2 parameters: {e}")))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; KEY_LEN];
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, &mut out)
            .map_err(|e| Error::Invalid(format!("cannot derive a key from the passphrase: {e}")))?;
        Ok(out)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Key id (16 hex digits).
    pub id: String,
    pub created: chrono::DateTime<chrono::Utc>,
    /// Present for passphrase keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<Kdf>,
    pub nonce: String,
    /// The key bag sealed by this key: secret (32 bytes) then master keys (32 bytes each).
    pub sealed_bag: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Keyring {
    pub format: String,
    pub format_version: u32,
    pub current: String,
    pub keys: Vec<Entry>,
}

/// What an unlocked keyring gives: the repository secret and every master key in the
/// bag that was opened.
pub struct Unlocked {
    pub secret: [u8; KEY_LEN],
    pub masters: Vec<[u8; KEY_LEN]>,
    /// The key that opened the bag.
    pub opened_with: KeyId,
}

impl Unlocked {
    pub fn master_keys(&self) -> Vec<MasterKey> {
        self.masters.iter().map(MasterKey::new).collect()
    }
}

fn bag_aad(id: &str) -> Vec<u8> {
    format!("keepfs-keyring-bag:{id}").into_bytes()
}

/// What one keyring entry seals: the repository secret and master keys.
struct Bag {
    secret: [u8; KEY_LEN],
    masters: Vec<[u8; KEY_LEN]>,
}

impl Bag {
    /// Opens the bag of `entry` with `key`; `None` when it does not authenticate or is
    /// malformed (a secret and at least one key, 32 bytes each).
    fn open(key: &MasterKey, entry: &Entry) -> Option<Bag> {
        let nonce = hex::decode(&entry.nonce).ok()?;
        let sealed = hex::decode(&entry.sealed_bag).ok()?;
        let bytes = key.unwrap(&nonce, &sealed, &bag_aad(&entry.id))?;
        if bytes.len() < 2 * KEY_LEN || bytes.len() % KEY_LEN != 0 {
            return None;
        }
        let mut chunks = bytes.chunks_exact(KEY_LEN).map(|c| <[u8; KEY_LEN]>::try_from(c).unwrap_or([0; KEY_LEN]));
        let secret = chunks.next()?;
        Some(Bag { secret, masters: chunks.collect() })
    }

    /// Seals the bag with `key` into `entry`'s nonce and sealed_bag.
    fn seal_into(&self, key: &MasterKey, entry_id: &str) -> Result<(String, String)> {
        let mut bytes = self.secret.to_vec();
        for m in &self.masters {
            bytes.extend_from_slice(m);
        }
        let (nonce, sealed) =
            key.wrap(&bytes, &bag_aad(entry_id)).map_err(|e| Error::Other(format!("cannot seal the keyring: {e}")))?;
        Ok((hex::encode(nonce), hex::encode(sealed)))
    }
}

/// Reads a key file: 64 hex digits (surrounding white space allowed) or 32 raw bytes.
pub fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN]> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::Invalid(format!("cannot read key file {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut key = [0u8; KEY_LEN];
    if hex::decode_to_slice(text.trim(), &mut key).is_ok() {
        return Ok(key);
    }
    if bytes.len() == KEY_LEN {
        key.copy_from_slice(&bytes);
        return Ok(key);
    }
    Err(Error::Invalid(format!(
        "key file {} holds no key (expected 64 hex digits, as `keepfs key new` writes)",
        path.display()
    )))
}

/// Writes a new random key file (mode 0600); refuses to replace an existing file.
pub fn write_new_key_file(path: &Path) -> Result<KeyId> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = random::<KEY_LEN>();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Refused(format!("{} exists; keepfs never overwrites a key file", path.display()))
        } else if e.kind() == std::io::ErrorKind::NotFound {
            Error::Invalid(format!("cannot create key file {}: its directory does not exist", path.display()))
        } else {
            Error::io(format!("cannot create key file {}", path.display()), e)
        }
    })?;
    f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("cannot write key file {}", path.display()), e))?;
    Ok(MasterKey::new(&key).id())
}

impl Keyring {
    pub fn parse(bytes: &[u8], storage: &str) -> Result<Keyring> {
        let k: Keyring = serde_json::from_slice(bytes)
            .map_err(|e| Error::Other(format!("storage '{storage}': the keyring object is damaged: {e}")))?;
        if k.format != KEYRING_FORMAT || k.format_version != KEYRING_FORMAT_VERSION {
            return Err(Error::Other(format!(
                "storage '{storage}': keyring format '{}' {} is not supported (this keepfs reads {KEYRING_FORMAT} {KEYRING_FORMAT_VERSION})",
                k.format, k.format_version
            )));
        }
        Ok(k)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn current_id(&self) -> Option<KeyId> {
        KeyId::from_hex(&self.current)
    }

    /// A new keyring with a fresh repository secret, sealed for the key from `source`.
    pub fn create(source: &KeySource) -> Result<(Keyring, Unlocked)> {
        let secret = random::<KEY_LEN>();
        let mut ring = Keyring {
            format: KEYRING_FORMAT.into(),
            format_version: KEYRING_FORMAT_VERSION,
            current: String::new(),
            keys: Vec::new(),
        };
        let (id, master) = ring.add(source, &secret, &[])?;
        ring.current = id.to_hex();
        Ok((ring, Unlocked { secret, masters: vec![master], opened_with: id }))
    }

    /// Adds an entry for the key from `source` whose bag holds `secret`, the `known`
    /// master keys and the new key itself; returns the new key's id and material.
    fn add(
        &mut self,
        source: &KeySource,
        secret: &[u8; KEY_LEN],
        known: &[[u8; KEY_LEN]],
    ) -> Result<(KeyId, [u8; KEY_LEN])> {
        let (master, kdf) = match source {
            KeySource::File(p) => (read_key_file(p)?, None),
            KeySource::Passphrase(pw) => {
                if pw.is_empty() {
                    return Err(Error::Invalid("the passphrase is empty".into()));
                }
                let kdf = Kdf::new();
                (kdf.derive(pw)?, Some(kdf))
            }
        };
        let key = MasterKey::new(&master);
        let id = key.id();
        if self.keys.iter().any(|e| e.id == id.to_hex()) {
            return Err(Error::Refused(format!("key {id} is in the keyring already; choose a new key")));
        }
        let mut masters: Vec<[u8; KEY_LEN]> = known.iter().filter(|k| **k != master).copied().collect();
        masters.push(master);
        let (nonce, sealed_bag) = Bag { secret: *secret, masters }.seal_into(&key, &id.to_hex())?;
        self.keys.push(Entry { id: id.to_hex(), created: chrono::Utc::now(), kdf, nonce, sealed_bag });
        Ok((id, master))
    }

    /// Opens the keyring with the key from `source`.
    pub fn unlock(&self, source: &KeySource, storage: &str) -> Result<Unlocked> {
        let candidates: Vec<(&Entry, [u8; KEY_LEN])> = match source {
            KeySource::File(p) => {
                let k = read_key_file(p)?;
                let id = MasterKey::new(&k).id().to_hex();
                self.keys.iter().filter(|e| e.id == id).map(|e| (e, k)).collect()
            }
            KeySource::Passphrase(pw) => {
                let mut out = Vec::new();
                for e in &self.keys {
                    if let Some(kdf) = &e.kdf {
                        let k = kdf.derive(pw)?;
                        if MasterKey::new(&k).id().to_hex() == e.id {
                            out.push((e, k));
                            break;
                        }
                    }
                }
                out
            }
        };
        let Some((entry, master)) = candidates.into_iter().next() else {
            let ids: Vec<String> = self
                .keys
                .iter()
                .map(|e| {
                    let kind = if e.kdf.is_some() { "passphrase" } else { "key file" };
                    let cur = if e.id == self.current { ", current" } else { "" };
                    format!("{} ({kind}{cur})", e.id)
                })
                .collect();
            return Err(Error::Key(format!(
                "storage '{storage}': the {} does not open its keyring; it needs key {} (keyring holds: {})",
                source.describe(),
                self.current,
                ids.join(", ")
            )));
        };
        let key = MasterKey::new(&master);
        let bag = Bag::open(&key, entry).ok_or_else(|| {
            Error::Other(format!("storage '{storage}': keyring entry {} is damaged or was altered", entry.id))
        })?;
        Ok(Unlocked { secret: bag.secret, masters: bag.masters, opened_with: key.id() })
    }

    /// Key rotation: adds the key from `source` (its bag holds every key `unlocked` knows)
    /// and makes it current. Returns its id.
    pub fn rotate(&mut self, unlocked: &Unlocked, source: &KeySource) -> Result<KeyId> {
        let (id, _) = self.add(source, &unlocked.secret, &unlocked.masters)?;
        self.current = id.to_hex();
        Ok(id)
    }

    /// Removes a key: its entry goes, and every remaining entry's bag is sealed again
    /// without it, so that no key left in the keyring can give the removed one back.
    /// `unlocked` must come from the current key (its bag knows every older key).
    pub fn remove(&mut self, id: KeyId, unlocked: &Unlocked) -> Result<()> {
        if self.current == id.to_hex() {
            return Err(Error::Refused(format!("key {id} is the current key; rotate to another one first")));
        }
        if !self.keys.iter().any(|e| e.id == id.to_hex()) {
            return Err(Error::Invalid(format!("key {id} is not in the keyring (`keepfs key list` shows it)")));
        }
        self.keys.retain(|e| e.id != id.to_hex());
        for e in &mut self.keys {
            let Some(master) = unlocked.masters.iter().find(|m| MasterKey::new(m).id().to_hex() == e.id) else {
                continue;
            };
            let key = MasterKey::new(master);
            let Some(mut bag) = Bag::open(&key, e) else { continue };
            bag.masters.retain(|m| MasterKey::new(m).id() != id);
            (e.nonce, e.sealed_bag) = bag.seal_into(&key, &e.id)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_unlock_rotate_remove() {
        let dir = tempfile::tempdir().unwrap();
        let f1 = dir.path().join("k1");
        let id1 = write_new_key_file(&f1).unwrap();
        assert!(matches!(write_new_key_file(&f1), Err(Error::Refused(_))));
        let (mut ring, u) = Keyring::create(&KeySource::File(f1.clone())).unwrap();
        assert_eq!(ring.current_id(), Some(id1));
        let ring2 = Keyring::parse(&ring.to_bytes(), "t").unwrap();
        let again = ring2.unlock(&KeySource::File(f1.clone()), "t").unwrap();
        assert_eq!(again.secret, u.secret);
        // A passphrase key added by rotation opens the same secret and knows key 1.
        let pw = KeySource::Passphrase("correct horse".into());
        let id2 = ring.rotate(&u, &pw).unwrap();
        assert_eq!(ring.current_id(), Some(id2));
        let by_pw = ring.unlock(&pw, "t").unwrap();
        assert_eq!(by_pw.secret, u.secret);
        assert_eq!(by_pw.masters.len(), 2);
        let e = ring.unlock(&KeySource::Passphrase("wrong".into()), "t").err().unwrap().to_string();
        assert!(e.contains(&format!("needs key {id2}")), "{e}");
        // The old key still opens its own (older) bag, which does not hold the new key.
        assert_eq!(ring.unlock(&KeySource::File(f1), "t").unwrap().masters.len(), 1);
        assert!(matches!(ring.remove(id2, &by_pw), Err(Error::Refused(_))));
        ring.remove(id1, &by_pw).unwrap();
        assert_eq!(ring.keys.len(), 1);
        // The current key's bag no longer holds key 1.
        assert_eq!(ring.unlock(&pw, "t").unwrap().masters.len(), 1);
    }
}

/// One key of `keepfs key list`.
#[derive(Clone, Debug, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub created: chrono::DateTime<chrono::Utc>,
    /// `key file` or `passphrase`.
    pub kind: String,
    pub current: bool,
    /// Block objects the database records as sealed by this key.
    pub objects: u64,
}

fn read_passphrase_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("cannot read passphrase file {}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// The key for a storage, from (in this order) $KEEPFS_KEY_FILE, $KEEPFS_PASSPHRASE, the
/// storage's configuration, or a prompt on the terminal. `None` when there is none.
pub fn key_source(config: &crate::config::StorageConfig, prompt: &str) -> Result<Option<KeySource>> {
    if let Some(f) = std::env::var_os("KEEPFS_KEY_FILE").filter(|f| !f.is_empty()) {
        return Ok(Some(KeySource::File(PathBuf::from(f))));
    }
    if let Ok(p) = std::env::var("KEEPFS_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(Some(KeySource::Passphrase(p)));
    }
    if let Some(f) = &config.key_file {
        return Ok(Some(KeySource::File(f.clone())));
    }
    if let Some(f) = &config.passphrase_file {
        return Ok(Some(KeySource::Passphrase(read_passphrase_file(f)?)));
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let pw = rpassword::prompt_password(prompt).map_err(|e| Error::io("cannot read the passphrase", e))?;
        return Ok(Some(KeySource::Passphrase(pw)));
    }
    Ok(None)
}

/// The new key for `key rotate`: a key file, a passphrase file, $KEEPFS_NEW_PASSPHRASE, or
/// a prompt (asked twice).
pub fn new_key_source(key_file: Option<&Path>, passphrase_file: Option<&Path>) -> Result<KeySource> {
    if let Some(f) = key_file {
        return Ok(KeySource::File(f.to_path_buf()));
    }
    if let Some(f) = passphrase_file {
        return Ok(KeySource::Passphrase(read_passphrase_file(f)?));
    }
    if let Ok(p) = std::env::var("KEEPFS_NEW_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(KeySource::Passphrase(p));
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let a =
            rpassword::prompt_password("New passphrase: ").map_err(|e| Error::io("cannot read the passphrase", e))?;
        let b = rpassword::prompt_password("Again: ").map_err(|e| Error::io("cannot read the passphrase", e))?;
        if a != b {
            return Err(Error::Invalid("the two passphrases differ".into()));
        }
        return Ok(KeySource::Passphrase(a));
    }
    Err(Error::Invalid(
        "no new key given: pass --new-key-file FILE or --new-passphrase-file FILE, or set KEEPFS_NEW_PASSPHRASE".into(),
    ))
}

use crate::repo::Repository;
use crate::storage::{SharedStorage, StorageError, retry};
use std::sync::Arc;

/// An object as the storage holds it now, or None when it is gone (deleted since it was
/// listed, or missing).
fn fresh_or_gone(storage: &dyn crate::storage::Storage, key: &str) -> Result<Option<Vec<u8>>> {
    match retry(4, || storage.get_fresh(key)) {
        Err(crate::storage::StorageError::NotFound { .. }) => Ok(None),
        other => Ok(Some(other?)),
    }
}

/// The new header of an object not sealed by the current key (None: it is current).
fn new_header(codec: &crate::transform::Codec, key: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    codec.rewrap_header(bytes).map_err(|e| Error::Object { context: format!("object {key}"), source: e })
}

/// Puts `prefix` on the object `key` read as `bytes`: true when done, false when the
/// object is gone.
fn rewrap(storage: &dyn crate::storage::Storage, key: &str, bytes: &[u8], prefix: &[u8]) -> Result<bool> {
    match retry(4, || storage.replace_prefix(key, bytes, prefix)) {
        Err(crate::storage::StorageError::NotFound { .. }) => Ok(false),
        other => other.map(|()| true).map_err(Error::from),
    }
}

/// Bytes of a large object read at a time when rekey copies it through a spool file.
const REWRAP_PIECE: u64 = 8 << 20;

impl Repository {
    /// Rewraps the header of the large object `key` (`size` bytes as listed, its header
    /// `head_len` bytes): it is copied into an unnamed spool file a piece at a time, its
    /// new header computed from the copy's own, and stored from the file (temp + rename
    /// on a file storage, a streamed PUT on S3). Some(true): rewrapped; Some(false):
    /// already current; None: gone. An object whose length changed while it was copied
    /// (written anew meanwhile) is an error to run rekey again for, never stored torn.
    fn rewrap_large(
        &self,
        storage: &dyn crate::storage::Storage,
        key: &str,
        size: u64,
        head_len: u64,
    ) -> Result<Option<bool>> {
        use std::io::{Read, Seek, Write};
        let dir = self.config.home.join("spool");
        let io = |e| Error::io(format!("cannot copy version object {key} into {}", dir.display()), e);
        let mut file = self.config.modes.unnamed_file(&dir).map_err(io)?;
        let mut at = 0u64;
        while at < size {
            let piece = match retry(4, || storage.get_range(key, at, REWRAP_PIECE.min(size - at))) {
                Err(StorageError::NotFound { .. }) => return Ok(None),
                other => other?,
            };
            if piece.is_empty() {
                break;
            }
            file.write_all(&piece).map_err(io)?;
            at += piece.len() as u64;
        }
        let beyond = match retry(4, || storage.get_range(key, size, 1)) {
            Err(StorageError::NotFound { .. }) => return Ok(None),
            other => other?,
        };
        if at != size || !beyond.is_empty() || size < head_len {
            return Err(Error::Other(format!(
                "version object {key} changed while key rekey copied it (listed with {size} bytes); run `keepfs key rekey` again"
            )));
        }
        let mut head = vec![0u8; head_len as usize];
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        file.read_exact(&mut head).map_err(io)?;
        let Some(prefix) = new_header(storage.codec(), key, &head)? else { return Ok(Some(false)) };
        let rest = size - prefix.len() as u64;
        let object = crate::storage::LargeObject {
            pieces: vec![
                crate::storage::Piece::Bytes(&prefix),
                crate::storage::Piece::File { file: &file, offset: prefix.len() as u64, len: rest },
            ],
        };
        retry(4, || storage.put_large(key, &object))?;
        Ok(Some(true))
    }

    fn read_keyring(&self, name: &str, raw: &SharedStorage) -> Result<Option<Keyring>> {
        match retry(4, || raw.get(KEYRING_KEY)) {
            Ok(b) => Ok(Some(Keyring::parse(&b, name)?)),
            Err(StorageError::NotFound { .. } | StorageError::Discarding { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn write_keyring(&self, raw: &SharedStorage, ring: &Keyring) -> Result<()> {
        let bytes = ring.to_bytes();
        retry(4, || raw.put(KEYRING_KEY, &bytes))?;
        retry(4, || raw.sync())?;
        Ok(())
    }

    /// Opens the keyring of `name` (if it has one) with its key and returns what unlocked
    /// it, or `None` for a plain storage. Refuses plaintext where encryption is required
    /// or was set up before.
    fn open_keyring(&self, name: &str) -> Result<Option<(Keyring, Unlocked)>> {
        let raw = self.raw_storage(name)?;
        let sc = self.config.storage(name)?.clone();
        let marked = self.db().storage_encrypted(name)?;
        let Some(ring) = self.read_keyring(name, &raw)? else {
            if marked {
                return Err(Error::Other(format!(
                    "storage '{name}' is encrypted (the database says so) but its keyring object is missing: `keepfs init --encrypt` may be writing it now (try again in a moment) or did not finish (run it again); otherwise put the object '{KEYRING_KEY}' back from a copy — keepfs will not write plaintext there"
                )));
            }
            if sc.require_encryption {
                return Err(Error::Config(format!(
                    "storage '{name}' must be encrypted (require_encryption / encrypt) but has no keyring; run `keepfs init --encrypt -S {name}` before the first backup"
                )));
            }
            return Ok(None);
        };
        let source = key_source(&sc, &format!("Passphrase for storage '{name}' (key {}): ", ring.current))?
            .ok_or_else(|| {
                Error::Key(format!(
                    "storage '{name}' is encrypted and no key was given: set KEEPFS_KEY_FILE or KEEPFS_PASSPHRASE, or key_file / passphrase_file in the configuration (it needs key {})",
                    ring.current
                ))
            })?;
        // A key file that cannot be read (lost, moved) says which key to bring back.
        let unlocked = ring.unlock(&source, name).map_err(|e| match e {
            Error::Invalid(m) if m.starts_with("cannot read key file") => {
                Error::Key(format!("storage '{name}': {m}; it needs key {}", ring.current))
            }
            e => e,
        })?;
        let current = ring.current_id().ok_or_else(|| {
            Error::Other(format!("storage '{name}': the keyring's current key '{}' is not a key id", ring.current))
        })?;
        if !unlocked.masters.iter().any(|m| MasterKey::new(m).id() == current) {
            return Err(Error::Key(format!(
                "storage '{name}': the {} is key {}, an older key; the keyring was rotated to {current}: give that key",
                source.describe(),
                unlocked.opened_with
            )));
        }
        if !marked {
            self.db().set_storage_encrypted(name)?;
        }
        Ok(Some((ring, unlocked)))
    }

    /// Called by [`Repository::storage`] on a storage's first use.
    pub(crate) fn unlock_storage(&self, name: &str) -> Result<SharedStorage> {
        let raw = self.raw_storage(name)?;
        let Some((ring, unlocked)) = self.open_keyring(name)? else {
            return Ok(raw);
        };
        let current = ring.current_id().ok_or_else(|| Error::Other(format!("storage '{name}': bad keyring")))?;
        let codec = crate::transform::Codec::sealed(&unlocked.secret, unlocked.master_keys(), current)
            .ok_or_else(|| Error::Other(format!("storage '{name}': the keyring does not hold its current key")))?;
        Ok(Arc::new(crate::storage::sealed::SealedStorage::new(raw, codec)))
    }

    /// Makes a storage encrypted (`keepfs init --encrypt`): a new repository secret and a
    /// keyring sealed for the key from `source`. Only before anything is stored there.
    pub fn init_encryption(&self, name: &str, source: &KeySource) -> Result<KeyId> {
        let _lease = self.keyring_lease(name, "init --encrypt")?;
        let raw = self.raw_storage(name)?;
        if self.read_keyring(name, &raw)?.is_some() {
            return Err(Error::Refused(format!(
                "storage '{name}' is encrypted already; `keepfs key rotate` changes its key"
            )));
        }
        let stored = raw.list("blocks/")?.len() + raw.list("versions/")?.len();
        let versions = self.list(None)?.iter().filter(|v| v.storage == name).count();
        let refused = |stored: usize, versions: usize| {
            Error::Refused(if stored == 0 && versions == 0 {
                format!(
                    "storage '{name}' has blocks recorded in the catalog by backups that stopped (none stored); encryption is chosen before the first backup: `keepfs cleanup` removes them once they are older than incomplete_grace, then run this again, or use a new storage"
                )
            } else {
                format!(
                    "storage '{name}' holds {stored} object(s) and {versions} version(s) already; encryption is chosen before the first backup (use a new storage)"
                )
            })
        };
        // Marked already and no keyring: an init that stopped before writing it. Backups
        // that met the mark meanwhile stored nothing (their incomplete versions and
        // placeholders are rows only), so with nothing stored it is finished now (a
        // drill killed init there, and every later init was refused for their rows).
        let unfinished = self.db().storage_encrypted(name)?;
        if stored > 0 || (versions > 0 && !unfinished) {
            return Err(refused(stored, versions));
        }
        let (ring, unlocked) = Keyring::create(source)?;
        // Marked first, under the catalog's write lock with the check that nothing was
        // recorded meanwhile: a backup that opened the storage before the keyring exists
        // then stores nothing (it reads the mark where it records its objects), instead of
        // plaintext on a storage said to be encrypted (found by a drill: its versions
        // could not be restored). The keyring follows; if writing it fails, the mark
        // keeps every writer out until `init --encrypt` is run again.
        if !unfinished && !self.db().mark_encrypted_if_unused(name)? {
            let versions = self.list(None)?.iter().filter(|v| v.storage == name).count();
            return Err(refused(raw.list("blocks/")?.len() + raw.list("versions/")?.len(), versions));
        }
        crate::test_knobs::stop_here("KEEPFS_TEST_STOP_BEFORE_KEYRING");
        self.write_keyring(&raw, &ring)?;
        self.reset_storage(name);
        Ok(unlocked.opened_with)
    }

    /// The keyring's keys, and the number of objects whose key the database does not
    /// record (after a database rebuild; `rekey` records them).
    pub fn list_keys(&self, name: &str) -> Result<(Vec<KeyInfo>, u64)> {
        let raw = self.raw_storage(name)?;
        let ring = self.read_keyring(name, &raw)?.ok_or_else(|| {
            Error::Invalid(format!("storage '{name}' is not encrypted (`keepfs init --encrypt` makes a new one so)"))
        })?;
        let sid = self.storage_id(name)?;
        let counts = self.db().objects_per_key(sid)?;
        let unrecorded = counts.iter().filter(|(k, _)| k.is_none()).map(|(_, n)| *n).sum();
        let keys = ring
            .keys
            .iter()
            .map(|e| KeyInfo {
                id: e.id.clone(),
                created: e.created,
                kind: if e.kdf.is_some() { "passphrase" } else { "key file" }.into(),
                current: e.id == ring.current,
                objects: counts
                    .iter()
                    .filter(|(k, _)| k.map(|k| k.to_hex()) == Some(e.id.clone()))
                    .map(|(_, n)| *n)
                    .sum(),
            })
            .collect();
        Ok((keys, unrecorded))
    }

    /// Holds off every other change of `name`'s keyring, from any process or host, while
    /// this one reads, changes and writes it: the keyring is one object, and two changes
    /// made at once would each write back what they read, the later one dropping the
    /// other's key (and with it what was sealed for that key).
    fn keyring_lease(&self, name: &str, purpose: &str) -> Result<crate::repo::Lease> {
        // A key change writes to the storage: only its owner's (see `owner`).
        self.claim_storage(name)?;
        self.lease(&format!("keyring/{name}"), purpose)?.map_err(|held| {
            Error::Refused(format!(
                "the keyring of storage '{name}' is being changed by a {} ({}); wait for it to finish",
                held.as_ref().map_or("key command", |s| s.purpose.as_str()),
                crate::repo::holder_name(held.as_ref())
            ))
        })
    }

    /// `keepfs key rotate`: the key from `new` becomes current; new objects are sealed
    /// with it, existing ones stay readable (`rekey` moves them over).
    pub fn rotate_key(&self, name: &str, new: &KeySource) -> Result<KeyId> {
        let _lease = self.keyring_lease(name, "key rotate")?;
        let (mut ring, unlocked) = self
            .open_keyring(name)?
            .ok_or_else(|| Error::Invalid(format!("storage '{name}' is not encrypted; nothing to rotate")))?;
        let id = ring.rotate(&unlocked, new)?;
        self.write_keyring(&self.raw_storage(name)?, &ring)?;
        self.reset_storage(name);
        Ok(id)
    }

    /// `keepfs key rekey`: every object not sealed by the current key gets its data key
    /// wrapped by the current key. Only block headers change (see docs/format.md for how
    /// each storage does it); block data is never decrypted or re-encrypted. A version
    /// object the catalog knows is written anew from the catalog instead (under a lock
    /// that keeps `rm` out): rewrapping the copy read here could put back labels, expiry
    /// or protection that changed meanwhile. Returns (rewrapped, already current, gone):
    /// gone are objects deleted since the list was made (by a cleanup or `rm`), being
    /// removed, or missing (deep-scrub finds those); blocks among them are not recorded
    /// as moved, and `key remove` checks version objects in the storage, so it refuses
    /// while any of them still needs an older key.
    pub fn rekey(&self, name: &str) -> Result<(u64, u64, u64)> {
        // Before the keyring is read: a rotation under way finishes first.
        let lease = self.keyring_lease(name, &format!("key rekey {name}"))?;
        let storage = self.storage(name)?;
        let codec = storage.codec();
        let current = codec
            .current_key()
            .ok_or_else(|| Error::Invalid(format!("storage '{name}' is not encrypted; nothing to rekey")))?;
        let sid = self.storage_id(name)?;
        let session = &lease.session;
        let versions = storage.list("versions/")?;
        let (mut rewrapped, mut already, mut gone) = (0u64, 0u64, 0u64);
        // Bounded batches, paged out of the catalog in id order (no list of every
        // object): a batch is made durable, then recorded, before the next.
        let mut after: Option<crate::block::BlockId> = None;
        loop {
            let chunk = self.db().objects_not_under(sid, current, after.as_ref(), 256)?;
            let Some(last) = chunk.last() else { break };
            after = Some(*last);
            let mut done = Vec::with_capacity(chunk.len());
            for id in chunk {
                let key = id.storage_key();
                // What the storage holds, not a local copy (and none is made).
                let Some(bytes) = fresh_or_gone(storage.as_ref(), &key)? else {
                    gone += 1;
                    continue;
                };
                match new_header(codec, &key, &bytes)? {
                    Some(prefix) if rewrap(storage.as_ref(), &key, &bytes, &prefix)? => rewrapped += 1,
                    Some(_) => {
                        gone += 1;
                        continue;
                    }
                    None => already += 1,
                }
                done.push(id);
            }
            retry(4, || storage.sync())?;
            self.db().set_object_keys(sid, &done, current)?;
        }
        // A version object's header decides, read on its own: the object may hold the
        // index of a 200 TB image, and one this catalog knows is written anew from the
        // catalog (as a stream) rather than from what is read here.
        let want = (crate::block::OBJECT_HEADER_LEN + crate::transform::aes::ENVELOPE_LEN) as u64;
        for entry in versions {
            let key = entry.key;
            let head = match retry(4, || storage.get_range(&key, 0, want.min(entry.size))) {
                Err(StorageError::NotFound { .. }) => {
                    gone += 1;
                    continue;
                }
                other => other?,
            };
            if new_header(codec, &key, &head)?.is_none() {
                already += 1;
                continue;
            }
            // A committed version of this storage that the catalog knows is written anew
            // from the catalog, so that a label, expiry or protection change made since it
            // was read stays. Any other version object (another catalog's, an incomplete
            // version's, one the catalog places elsewhere) has only this copy: its header
            // is rewrapped.
            let uid = key.strip_prefix("versions/").and_then(|u| crate::version::VersionUid::parse(u).ok());
            let ours = match uid.map(|u| self.version(u)) {
                Some(Ok(v)) => v.storage == name && v.status != crate::version::Status::Incomplete,
                Some(Err(Error::VersionNotFound(_))) | None => false,
                Some(Err(e)) => return Err(e),
            };
            if let (true, Some(uid)) = (ours, uid) {
                match session.lock_version(uid, "key rekey").and_then(|_| self.refresh_version_object(uid)) {
                    Ok(()) => rewrapped += 1,
                    // Being removed (or gone): `key remove` checks version objects itself.
                    Err(
                        Error::Storage(crate::storage::StorageError::NotFound { .. })
                        | Error::VersionNotFound(_)
                        | Error::Refused(_),
                    ) => gone += 1,
                    Err(e) => return Err(e),
                }
                continue;
            }
            // Only this copy: its header is rewrapped. A large one (another catalog's
            // version of a 200 TB image, say) goes through a spool file, never whole in
            // memory.
            if crate::version_object::may_be_streamed(entry.size) {
                match self.rewrap_large(storage.as_ref(), &key, entry.size, want)? {
                    Some(true) => rewrapped += 1,
                    Some(false) => already += 1,
                    None => gone += 1,
                }
                continue;
            }
            // A small one is read whole.
            let Some(bytes) = fresh_or_gone(storage.as_ref(), &key)? else {
                gone += 1;
                continue;
            };
            let Some(prefix) = new_header(codec, &key, &bytes)? else {
                already += 1;
                continue;
            };
            if rewrap(storage.as_ref(), &key, &bytes, &prefix)? {
                rewrapped += 1;
            } else {
                gone += 1;
            }
        }
        drop(lease);
        Ok((rewrapped, already, gone))
    }

    /// `keepfs key remove`: refuses while any object may still need the key.
    pub fn remove_key(&self, name: &str, id: KeyId) -> Result<()> {
        let lease = self.keyring_lease(name, "key remove")?;
        let (mut ring, unlocked) =
            self.open_keyring(name)?.ok_or_else(|| Error::Invalid(format!("storage '{name}' is not encrypted")))?;
        let sid = self.storage_id(name)?;
        let current = ring.current_id().unwrap_or(id);
        if current != id {
            // A process keeps the keyring it read when it started: one that began before
            // the rotation (a backup, a mount or NBD server, on any host) may still seal
            // new objects with the key being removed, and record them after the checks
            // below. Refused while any such process runs.
            let me = lease.session.id;
            let busy: Vec<crate::catalog::Session> = self
                .live_sessions()?
                .into_iter()
                .filter(|s| s.id != me && (s.writes || s.purpose == "serve"))
                .collect();
            if let Some(s) = busy.first() {
                return Err(Error::Refused(format!(
                    "{} process(es) that may still seal new objects with an older key are running (e.g. {} by {}); run `keepfs key remove` again once they have ended (restart mounts and NBD servers; `keepfs database sessions` lists them)",
                    busy.len(),
                    s.purpose,
                    crate::repo::holder_name(Some(s))
                )));
            }
            let left = self.db().count_objects_not_under(sid, current)?;
            if left > 0 {
                return Err(Error::Refused(format!(
                    "{left} object(s) of storage '{name}' may still be sealed by older keys; run `keepfs key rekey -S {name}` first"
                )));
            }
            // Version objects have no rows of their own: their headers say.
            let storage = self.storage(name)?;
            let mut stale = 0u64;
            for e in storage.list("versions/")? {
                if let Some(bytes) = fresh_or_gone(storage.as_ref(), &e.key)? {
                    stale += new_header(storage.codec(), &e.key, &bytes)?.is_some() as u64;
                }
            }
            if stale > 0 {
                return Err(Error::Refused(format!(
                    "{stale} version object(s) of storage '{name}' are still sealed by older keys; run `keepfs key rekey -S {name}` first"
                )));
            }
        }
        ring.remove(id, &unlocked)?;
        self.write_keyring(&self.raw_storage(name)?, &ring)?;
        self.reset_storage(name);
        Ok(())
    }
}
