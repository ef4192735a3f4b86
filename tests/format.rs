//! The formats of docs/format.md, checked against committed samples in tests/data/.
//! A layout change fails here until the samples and the document are updated together
//! (regenerate with `KEEPFS_WRITE_SAMPLES=1 cargo test --test format`).

mod common;
use keepfs::block::{BlockId, FLAG_ZSTD, ObjectKind, decode_block, encode_object, parse_header};
use keepfs::index::BlockIndex;
use keepfs::repo::{decode_version_object, encode_version_object};
use keepfs::version::{Stats, Status, Version, VersionUid};
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn text_block() -> Vec<u8> {
    b"keepfs sample block: the quick brown fox jumps over the lazy dog\n".repeat(64)
}

fn random_block() -> Vec<u8> {
    common::random_bytes(2026, 4096)
}

fn sample_version() -> (Version, BlockIndex) {
    let mut index = BlockIndex::new_sparse(7, 3 * 4096 + 100, 4096);
    index.entries.set(0, BlockId::of(&text_block()));
    index.entries.set(2, BlockId::of(&random_block()));
    let v = Version {
        uid: VersionUid(7),
        date: keepfs::filter::parse_date("2026-11-22T12:00:00Z").unwrap(),
        name: "sample".into(),
        snapshot: "snap-1".into(),
        size: index.size,
        block_size: 4096,
        status: Status::Valid,
        protected: true,
        storage: "default".into(),
        labels: [("env".to_string(), "prod".to_string()), ("tier".to_string(), String::new())].into(),
        stats: Stats {
            bytes_read: 12388,
            bytes_written: 8192,
            bytes_stored: 4300,
            bytes_deduplicated: 0,
            bytes_sparse: 4196,
            duration_ms: 3,
        },
        expire: None,
        host: None,
    };
    (v, index)
}

#[test]
fn committed_samples_decode() {
    let (version, index) = sample_version();
    if std::env::var_os("KEEPFS_WRITE_SAMPLES").is_some() {
        let text = text_block();
        std::fs::write(
            data("block-zstd.obj"),
            encode_object(ObjectKind::Block, &BlockId::of(&text).0, &text, 3).unwrap(),
        )
        .unwrap();
        let rnd = random_block();
        std::fs::write(
            data("block-plain.obj"),
            encode_object(ObjectKind::Block, &BlockId::of(&rnd).0, &rnd, 3).unwrap(),
        )
        .unwrap();
        // index.kfi and version.obj are format 1 samples, written by keepfs before format
        // 2: frozen, never regenerated (this build cannot write a format 1 version object).
        std::fs::write(data("index-v2.kfi"), index.encode().unwrap()).unwrap();
        std::fs::write(
            data("version-v2.obj"),
            encode_version_object(keepfs::transform::Codec::plain(), &version, &index).unwrap(),
        )
        .unwrap();
    }

    // A compressed block object: header fields at their documented offsets.
    let obj = std::fs::read(data("block-zstd.obj")).unwrap();
    assert_eq!(&obj[0..8], b"KEEPFSOB");
    assert_eq!(u16::from_le_bytes([obj[8], obj[9]]), 1, "format version");
    assert_eq!(u16::from_le_bytes([obj[10], obj[11]]), 1, "kind block");
    let (header, header_len) = parse_header(&obj).unwrap();
    assert_eq!(header_len, 72);
    assert_eq!(header.flags, FLAG_ZSTD);
    assert_eq!(header.plain_len, text_block().len() as u64);
    assert_eq!(header.id, BlockId::of(&text_block()).0);
    assert_eq!(decode_block(&obj, &BlockId::of(&text_block())).unwrap(), text_block());

    // An incompressible block is stored as is, byte for byte what this build writes.
    let obj = std::fs::read(data("block-plain.obj")).unwrap();
    let rnd = random_block();
    assert_eq!(obj, encode_object(ObjectKind::Block, &BlockId::of(&rnd).0, &rnd, 3).unwrap());
    assert_eq!(&obj[72..], &rnd[..]);
    assert_eq!(decode_block(&obj, &BlockId::of(&rnd)).unwrap(), rnd);

    // The index, format 2: the header fields at their documented offsets, and a body
    // that is, once decompressed, exactly the runs docs/format.md describes.
    let idx = std::fs::read(data("index-v2.kfi")).unwrap();
    assert_eq!(&idx[0..8], b"KEEPFSIX");
    let le64 = |at: usize| u64::from_le_bytes(idx[at..at + 8].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([idx[8], idx[9]]), 2, "format version");
    assert_eq!(u16::from_le_bytes([idx[10], idx[11]]), 32, "entry size");
    assert_eq!(u32::from_le_bytes(idx[12..16].try_into().unwrap()), 4096, "block size");
    assert_eq!((le64(16), le64(24), le64(32)), (7, 3 * 4096 + 100, 4), "uid, size, blocks");
    let run = |sparse: u64, ids: &[BlockId]| {
        let mut b = [sparse.to_le_bytes(), (ids.len() as u64).to_le_bytes()].concat();
        ids.iter().for_each(|i| b.extend_from_slice(&i.0));
        b
    };
    let body = [
        run(0, &[BlockId::of(&text_block())]),
        run(1, &[BlockId::of(&random_block())]),
        run(1, &[]), // the sparse last block
    ]
    .concat();
    assert_eq!(le64(72), body.len() as u64, "body length");
    assert_eq!(zstd::decode_all(&idx[80..]).unwrap(), body);
    assert_eq!(BlockIndex::decode(&idx).unwrap(), index);
    assert_eq!(BlockIndex::decode(&index.encode().unwrap()).unwrap(), index);

    // The version object (format 2 index): fields, labels and index come back.
    let obj = std::fs::read(data("version-v2.obj")).unwrap();
    let (v, i) = decode_version_object(keepfs::transform::Codec::plain(), &obj).unwrap();
    assert_eq!(v, version);
    assert_eq!(i, index);
}

/// Repositories made before index format 2 keep reading: the committed format 1 samples
/// (one 32-byte entry per block) decode to the same version and index, byte for byte
/// what that format is.
#[test]
fn format_1_samples_still_decode() {
    let (version, index) = sample_version();
    let idx = std::fs::read(data("index.kfi")).unwrap();
    assert_eq!(&idx[0..8], b"KEEPFSIX");
    assert_eq!(u16::from_le_bytes([idx[8], idx[9]]), 1, "format version");
    assert_eq!(idx.len(), 80 + 4 * 32);
    assert_eq!(idx, index.encode_v1());
    assert_eq!(BlockIndex::decode(&idx).unwrap(), index);
    let obj = std::fs::read(data("version.obj")).unwrap();
    let (v, i) = decode_version_object(keepfs::transform::Codec::plain(), &obj).unwrap();
    assert_eq!(v, version);
    assert_eq!(i, index);
}

/// An encrypted storage's keyring and a sealed block object, committed: the key file
/// `sample.key` opens the keyring, whose secret names the block and whose key unwraps it.
#[test]
fn committed_encrypted_samples_decode() {
    use keepfs::keys::{KeySource, Keyring};
    use keepfs::transform::Codec;
    let key = KeySource::File(data("sample.key"));
    if std::env::var_os("KEEPFS_WRITE_SAMPLES").is_some() {
        std::fs::write(data("sample.key"), format!("{}\n", "5a".repeat(32))).unwrap();
        let (ring, u) = Keyring::create(&key).unwrap();
        std::fs::write(data("keyring.json"), ring.to_bytes()).unwrap();
        let codec = Codec::sealed(&u.secret, u.master_keys(), u.opened_with).unwrap();
        let text = text_block();
        std::fs::write(
            data("block-sealed.obj"),
            codec.encode(ObjectKind::Block, &codec.id_of(&text).0, &text, 3).unwrap(),
        )
        .unwrap();
    }
    let ring = Keyring::parse(&std::fs::read(data("keyring.json")).unwrap(), "sample").unwrap();
    assert_eq!(ring.format, "keepfs-keyring");
    assert_eq!(ring.format_version, 1);
    let u = ring.unlock(&key, "sample").unwrap();
    assert_eq!(u.opened_with.to_hex(), ring.current);
    let codec = Codec::sealed(&u.secret, u.master_keys(), u.opened_with).unwrap();
    let obj = std::fs::read(data("block-sealed.obj")).unwrap();
    let (header, header_len) = parse_header(&obj).unwrap();
    assert_eq!(header_len, 72 + 80, "fixed header, then the 80-byte envelope");
    assert_eq!(header.flags, FLAG_ZSTD | keepfs::block::FLAG_AES256GCM);
    assert_eq!(hex::encode(&header.envelope[..8]), ring.current, "the envelope names the master key");
    let id = codec.id_of(&text_block());
    assert_ne!(id, BlockId::of(&text_block()), "ids are keyed");
    assert_eq!(codec.decode_block(&obj, &id).unwrap(), text_block());
    // Without the key it is not readable.
    assert!(decode_block(&obj, &id).is_err());
}

/// A storage's `owner` object, committed (docs/format.md, "Storage owner"): it decodes,
/// and one a backup writes has exactly its fields. Anything else at that name is refused.
#[test]
fn the_committed_owner_sample_decodes_and_matches_what_a_backup_writes() {
    use keepfs::owner::Owner;
    let sample = std::fs::read(data("owner.json")).unwrap();
    let owner = Owner::parse(&sample, "sample").unwrap();
    assert_eq!(owner.format, "keepfs-owner");
    assert_eq!(owner.host, "host1");
    assert_eq!(owner.location, "host1:/var/lib/keepfs/keepfs.sqlite");
    let repo = common::Repo::new();
    std::fs::write(repo.path("img"), common::random_bytes(1, 4096)).unwrap();
    repo.backup("img", "vm", &[]);
    let written = std::fs::read(repo.storage().join("owner")).unwrap();
    let keys = |b: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&written), keys(&sample));
    Owner::parse(&written, "default").unwrap();
    for bad in
        [&b"{}"[..], b"not json", br#"{"format":"keepfs-owner","catalog":"xyz","location":"","host":"","claimed":""}"#]
    {
        assert!(Owner::parse(bad, "default").is_err());
    }
}
