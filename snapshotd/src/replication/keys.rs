//! The keys of sealed volumes (`docs/replication.md`, "Raw sends"): a raw
//! replica stores its source's ciphertext and this appliance reads it only
//! once an operator loads the source's key (its key file or passphrase).
//! Loaded keys live in the engine's memory only: never stored, never
//! logged, gone at a restart or an unload.

use cdm_api::replication::VolumeKey;
use cdm_api::{ApiError, ApiResult};
use cdmfs::{KeySource, Pool, SealRec};

use crate::appliance::engine;

/// The seal of `volume`: 404 if there is no such volume, 400 `not_sealed`
/// if its data is under this appliance's own key (or none).
fn seal_of(pool: &Pool, volume: &str) -> ApiResult<SealRec> {
    pool.volume(volume).map_err(engine)?.seal.ok_or_else(|| {
        ApiError::new(
            400,
            "not_sealed",
            format!(
                "volume {volume} is not sealed (not a raw replica): this appliance reads it \
                 with its own key, if it needs one"
            ),
        )
    })
}

/// The key a request gives: a key file's bytes (read as the appliance
/// reads its own `--key-file`), or a passphrase.
fn key_of(req: &VolumeKey) -> ApiResult<KeySource> {
    match (&req.key_file_hex, &req.passphrase) {
        (Some(h), None) => {
            let b = hex::decode(h.trim()).map_err(|_| {
                ApiError::bad_request("key_file_hex must be the key file's bytes in hex")
            })?;
            KeySource::from_key_file_bytes(&b).map_err(|e| ApiError::bad_request(e.to_string()))
        }
        (None, Some(p)) if !p.is_empty() => Ok(KeySource::Passphrase(p.clone())),
        _ => Err(ApiError::bad_request(
            "give exactly one of \"key_file_hex\" and \"passphrase\"",
        )),
    }
}

/// `POST /v1/volumes/{name}/key`: 409 `wrong_key` if the key is not the
/// one the volume was sealed with. Every volume under the same seal
/// (its cascade, its clones) becomes readable with it.
pub fn load(pool: &Pool, volume: &str, req: &VolumeKey) -> ApiResult<()> {
    let key = key_of(req)?;
    let seal = seal_of(pool, volume)?;
    pool.load_seal_key(&seal, &key).map_err(|e| match e {
        // The engine says which (a passphrase for a key-file seal, ...).
        cdmfs::Error::WrongKey(m) => ApiError::new(
            409,
            "wrong_key",
            format!("this key does not open volume {volume}: {m}"),
        ),
        e => engine(e),
    })
}

/// `DELETE /v1/volumes/{name}/key`: the volume (and every volume under
/// the same seal) is unreadable here again.
pub fn unload(pool: &Pool, volume: &str) -> ApiResult<()> {
    let seal = seal_of(pool, volume)?;
    if pool.seal_is_own(&seal).map_err(engine)? {
        return Err(ApiError::bad_request(format!(
            "volume {volume} is sealed with this appliance's own key, which cannot be unloaded"
        )));
    }
    pool.unload_seal_key(&seal.id());
    Ok(())
}

/// 409 `key_required` for a sealed volume or point whose key is not
/// loaded: what the operator must do, rather than an error on first read.
pub fn require_key(seal: Option<&SealRec>, loaded: bool, what: &str) -> ApiResult<()> {
    match seal {
        Some(_) if !loaded => Err(ApiError::new(
            409,
            "key_required",
            format!(
                "{what} is sealed (a raw replica) and its key is not loaded here: load the \
                 source appliance's key first (cdmctl volume load-key)"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_under_this_appliance_own_key_cannot_be_unloaded() {
        let dir = tempfile::tempdir().unwrap();
        let pool =
            super::super::testutil::pool_keyed(dir.path(), Some(KeySource::Key(vec![1; 32])));
        let policy = cdmfs::DataPolicy {
            dedup: true,
            compression: 0,
            encryption: Some(cdmfs::Cipher::Aes256Xts),
        };
        let e = pool.create_volume_with("e", 1 << 20, 4096, policy).unwrap();
        let seal = pool.seal_for_send(cdmfs::Target::Volume(e.id)).unwrap();
        let sealed = cdmfs::DataPolicy {
            dedup: true,
            compression: 3,
            encryption: None,
        };
        pool.create_volume_sealed("s", 1 << 20, 4096, sealed, seal)
            .unwrap();
        let err = unload(&pool, "s").unwrap_err();
        assert_eq!(err.status, 400, "{err:?}");
        assert!(err.message.contains("own key"), "{err:?}");
    }

    #[test]
    fn a_request_gives_exactly_one_usable_key() {
        let hex32 = "ab".repeat(32);
        let ok = VolumeKey {
            key_file_hex: Some(hex::encode([7u8; 32])),
            passphrase: None,
        };
        assert!(matches!(key_of(&ok), Ok(KeySource::Key(k)) if k == vec![7u8; 32]));
        // A key file that holds hex digits reads as the daemon reads it.
        let text = VolumeKey {
            key_file_hex: Some(hex::encode(format!("{hex32}\n"))),
            passphrase: None,
        };
        assert!(matches!(key_of(&text), Ok(KeySource::Key(k)) if k == vec![0xab; 32]));
        let pass = VolumeKey {
            key_file_hex: None,
            passphrase: Some("secret".into()),
        };
        assert!(matches!(key_of(&pass), Ok(KeySource::Passphrase(p)) if p == "secret"));
        for bad in [
            VolumeKey::default(),
            VolumeKey {
                key_file_hex: Some("zz".into()),
                passphrase: None,
            },
            VolumeKey {
                key_file_hex: Some(hex::encode([1u8; 5])),
                passphrase: None,
            },
            VolumeKey {
                key_file_hex: Some(hex32.clone()),
                passphrase: Some("x".into()),
            },
            VolumeKey {
                key_file_hex: None,
                passphrase: Some(String::new()),
            },
        ] {
            assert_eq!(key_of(&bad).err().map(|e| e.status), Some(400), "{bad:?}");
        }
    }
}
