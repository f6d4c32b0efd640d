//! Sealed volumes (docs/design.md, "Sealed volumes"): volumes whose
//! stored blocks are ciphertext under seal keys this pool may not hold,
//! the raw side of encrypted replication. The pool stores a sealed
//! volume's bytes as ordinary data (dedup and compression on the sealed
//! bytes); `read` and `write` go through the seal keys when they are
//! loaded, `read_sealed` and `write_sealed` move the sealed bytes as they
//! are, without keys. The block format is `pipeline/seal.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::pipeline::{self, DataPolicy, KeySource, Keys, SealRec, MIN_SEALED_BLOCK};

use super::read::check_range;
use super::{Inner, Pool, Target, VolumeInfo};

/// Seal keys in memory: loaded by seal id, and this pool's own (by its key
/// check value: a pool can always read what it sealed itself).
#[derive(Default)]
pub(super) struct SealKeys {
    loaded: HashMap<String, Arc<Keys>>,
    pub(super) own: Option<(String, Arc<Keys>)>,
    /// Seal records this pool has been shown (id → key check value), so
    /// `seal_key_loaded` can answer by id for seals of its own key.
    seen: HashMap<String, String>,
}

/// Bounds the seal records remembered in `SealKeys::seen`.
const MAX_SEEN: usize = 4096;

impl SealKeys {
    fn get(&self, seal: &SealRec) -> Option<Arc<Keys>> {
        if let Some(k) = self.loaded.get(&seal.id()) {
            return Some(k.clone());
        }
        match &self.own {
            Some((check, k)) if *check == seal.crypto.check => Some(k.clone()),
            _ => None,
        }
    }

    pub(super) fn has(&self, seal: &SealRec) -> bool {
        self.get(seal).is_some()
    }

    /// Remembers `seal` (its id and key check) for `seal_key_loaded`.
    fn note(&mut self, seal: &SealRec) {
        if self.seen.len() >= MAX_SEEN {
            self.seen.clear();
        }
        self.seen.insert(seal.id(), seal.crypto.check.clone());
    }
}

/// What sealing needs to know of a target.
struct SealView {
    size: u64,
    bs: u64,
    policy: DataPolicy,
    seal: Option<SealRec>,
    /// The volume lineage: a snapshot's volume, or the volume itself.
    lineage: u64,
    /// The lineage's salt (`VolumeRec::seal_salt`).
    salt: u64,
    name: String,
}

/// A sealed volume's size: whole sectors, so every block (the last one
/// included) is at least [`MIN_SEALED_BLOCK`] bytes.
pub(super) fn check_sealed_size(name: &str, size: u64) -> Result<()> {
    if !size.is_multiple_of(MIN_SEALED_BLOCK as u64) {
        return Err(Error::Invalid(format!(
            "volume {name}: a sealed volume's size must be a multiple of \
             {MIN_SEALED_BLOCK} bytes, not {size}"
        )));
    }
    Ok(())
}

/// Growing a sealed volume: its last block is sealed at its length, so a
/// short last block cannot lengthen without the keys; refused.
pub(super) fn check_sealed_grow(name: &str, old: u64, new: u64, bs: u32) -> Result<()> {
    check_sealed_size(name, new)?;
    if new != old && !old.is_multiple_of(bs as u64) {
        return Err(Error::Invalid(format!(
            "sealed volume {name} ends in a short block ({old} bytes is not a multiple of \
             its block size {bs}): it cannot grow (send it again in full)"
        )));
    }
    Ok(())
}

impl Inner {
    fn seal_view(&self, t: Target) -> Result<SealView> {
        match t {
            Target::Volume(id) => self
                .volumes
                .get(&id)
                .map(|v| SealView {
                    size: v.size,
                    bs: v.block_size as u64,
                    policy: v.policy,
                    seal: v.seal.clone(),
                    lineage: id,
                    salt: v.salt(),
                    name: v.name.clone(),
                })
                .ok_or_else(|| Error::NotFound(format!("volume {id}"))),
            Target::Snapshot(id) => self
                .snapshots
                .get(&id)
                .map(|s| SealView {
                    size: s.size,
                    bs: s.block_size as u64,
                    policy: s.policy,
                    seal: s.seal.clone(),
                    lineage: s.volume_id,
                    salt: s.salt(),
                    name: self
                        .volumes
                        .get(&s.volume_id)
                        .map(|v| v.name.clone())
                        .unwrap_or_else(|| format!("{}", s.volume_id)),
                })
                .ok_or_else(|| Error::NotFound(format!("snapshot {id}"))),
        }
    }

    /// The keys of `seal`: loaded, or this pool's own. Without them:
    /// `Error::KeyRequired` for a seal of this pool's key (the pool was
    /// opened without it), else `Error::SealKeyRequired`.
    fn seal_keys(&self, seal: &SealRec) -> Result<Arc<Keys>> {
        seal.check()?;
        if let Some(k) = self.seals.get(seal) {
            return Ok(k);
        }
        let ours = self
            .pool_rec
            .crypto
            .as_ref()
            .is_some_and(|c| c.check == seal.crypto.check);
        Err(if ours {
            Error::KeyRequired
        } else {
            Error::SealKeyRequired(seal.id())
        })
    }

    /// Checks a seal record that comes in from outside and remembers it.
    fn admit(&mut self, seal: &SealRec) -> Result<()> {
        seal.check()?;
        self.seals.note(seal);
        Ok(())
    }

    /// The seal this pool sends encrypted target `v` with (its key must be
    /// loaded, `unlocked`): under this pool's key, with a nonce of the
    /// pool, the volume lineage and its salt, at the target's block size.
    fn own_seal(&self, v: &SealView, unlocked: bool) -> Result<SealRec> {
        let Some(cipher) = v.policy.encryption else {
            return Err(Error::Invalid(format!(
                "volume {} is not encrypted: only encrypted or sealed volumes can be sent raw",
                v.name
            )));
        };
        if !unlocked {
            return Err(Error::KeyRequired);
        }
        check_sealed_size(&v.name, v.size)?;
        let crypto =
            self.pool_rec.crypto.clone().ok_or_else(|| {
                Error::Corrupt("an encrypted volume in a pool without a key".into())
            })?;
        Ok(SealRec {
            version: pipeline::SEAL_VERSION,
            crypto,
            cipher,
            nonce: pipeline::seal_nonce(&self.sb.uuid, v.lineage, v.salt),
            block_size: v.bs as u32,
        })
    }

    /// Whether seal `id` is one of this pool's own key that it knows of:
    /// shown to it, held by a sealed target here, or the seal one of its
    /// encrypted targets is sent with.
    fn own_seal_known(&self, id: &str, unlocked: bool) -> bool {
        let Some(check) = self.pool_rec.crypto.as_ref().map(|c| &c.check) else {
            return false;
        };
        if self.seals.seen.get(id) == Some(check) {
            return true;
        }
        let held = |s: &Option<SealRec>| {
            s.as_ref()
                .is_some_and(|s| s.crypto.check == *check && s.id() == id)
        };
        if self.volumes.values().any(|v| held(&v.seal))
            || self.snapshots.values().any(|s| held(&s.seal))
        {
            return true;
        }
        let targets = self
            .volumes
            .iter()
            .map(|(&i, v)| (Target::Volume(i), v.policy));
        let snaps = self
            .snapshots
            .iter()
            .map(|(&i, s)| (Target::Snapshot(i), s.policy));
        targets
            .chain(snaps)
            .filter(|(_, p)| p.encryption.is_some())
            .filter_map(|(t, _)| self.seal_view(t).ok())
            .filter(|v| v.seal.is_none())
            .any(|v| self.own_seal(&v, unlocked).is_ok_and(|s| s.id() == id))
    }
}

impl Pool {
    /// Creates a sealed volume: its blocks arrive sealed (`write_sealed`)
    /// and are stored as they are. `policy.encryption` must be None (the
    /// bytes are ciphertext already); dedup and compression apply to the
    /// sealed bytes.
    pub fn create_volume_sealed(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        policy: DataPolicy,
        seal: SealRec,
    ) -> Result<VolumeInfo> {
        if policy.encryption.is_some() {
            return Err(Error::Invalid(format!(
                "volume {name}: a sealed volume holds ciphertext already; \
                 create it without encryption"
            )));
        }
        self.lock()?.admit(&seal)?;
        if seal.block_size != block_size {
            return Err(Error::Invalid(format!(
                "volume {name}: the seal is for blocks of {} bytes, not {block_size}",
                seal.block_size
            )));
        }
        check_sealed_size(name, size)?;
        self.create_volume_rec(name, size, block_size, policy, Some(seal))
    }

    /// Loads the keys of `seal` from the key (file or passphrase) of the
    /// pool that sealed it; every volume, snapshot and clone with that
    /// seal becomes readable and writable. A wrong key is
    /// `Error::WrongKey` and changes nothing.
    pub fn load_seal_key(&self, seal: &SealRec, key: &KeySource) -> Result<()> {
        self.lock()?.admit(seal)?;
        // Outside the pool lock: a passphrase costs an Argon2id run.
        let keys = Keys::unlock_seal(&seal.crypto, key)?;
        self.lock()?.seals.loaded.insert(seal.id(), Arc::new(keys));
        Ok(())
    }

    /// Forgets the keys loaded for seal `seal_id` (this pool's own stay).
    pub fn unload_seal_key(&self, seal_id: &str) {
        // Works on a failed pool too: forgetting a key must not fail.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.seals.loaded.remove(seal_id);
    }

    /// Whether the keys of seal `seal_id` are in memory: loaded, or, with
    /// this pool unlocked, a seal of this pool's own key. An id does not
    /// name its key, so for the second the pool must know the seal: one
    /// it was shown (`create_volume_sealed`, `load_seal_key`,
    /// `read_sealed`, `write_sealed`, `write_unsealing`), one a target here
    /// holds, or one it sends an encrypted target with (`seal_for_send`).
    pub fn seal_key_loaded(&self, seal_id: &str) -> bool {
        let Ok(g) = self.lock() else {
            return false;
        };
        if g.seals.loaded.contains_key(seal_id) {
            return true;
        }
        g.seals.own.is_some() && g.own_seal_known(seal_id, self.keys.is_some())
    }

    /// How target `t` is sent raw: a sealed target's own seal; for a
    /// target encrypted with this pool's key, a seal under this pool's key
    /// whose nonce is derived from the pool, the volume lineage and its
    /// salt (every snapshot of a volume seals the same way, so
    /// incrementals line up; a clone is a lineage of its own).
    pub fn seal_for_send(&self, t: Target) -> Result<SealRec> {
        let mut g = self.lock()?;
        let v = g.seal_view(t)?;
        let seal = match v.seal.clone() {
            Some(seal) => seal,
            None => g.own_seal(&v, self.keys.is_some())?,
        };
        // Known by id from here on, even once its volume is gone (a raw
        // replica of it may come back).
        g.seals.note(&seal);
        Ok(seal)
    }

    /// Reads whole blocks of `t` sealed with `seal` (`offset` and
    /// `buf.len()` block-aligned; the last block may end at the end of the
    /// target). A sealed target (of that seal) gives its stored bytes as
    /// they are, without keys; an encrypted target gives its blocks sealed
    /// with `seal` (its keys and this pool's needed).
    pub fn read_sealed(
        &self,
        t: Target,
        offset: u64,
        buf: &mut [u8],
        seal: &SealRec,
    ) -> Result<()> {
        let (v, keys) = {
            let mut g = self.lock()?;
            g.admit(seal)?;
            let v = g.seal_view(t)?;
            if let Some(own) = &v.seal {
                if own.id() != seal.id() {
                    return Err(Error::Invalid(format!(
                        "volume {} is sealed with seal {}, not {}",
                        v.name,
                        own.id(),
                        seal.id()
                    )));
                }
                (v, None)
            } else {
                // Only the seal this volume is sent with: another nonce
                // could be one another lineage seals with.
                let own = g.own_seal(&v, self.keys.is_some())?;
                if own.id() != seal.id() {
                    return Err(Error::Invalid(format!(
                        "volume {} is sent raw with seal {}, not {}",
                        v.name,
                        own.id(),
                        seal.id()
                    )));
                }
                let keys = g.seal_keys(seal)?;
                (v, Some(keys))
            }
        };
        pipeline::check_aligned(v.bs, v.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let Some(keys) = keys else {
            return self.read_in(t, v.bs as u32, offset, buf);
        };
        let mut plain = vec![0u8; buf.len()];
        self.read(t, offset, &mut plain)?;
        let sealed = pipeline::seal_range(&keys, seal, v.bs, v.size, offset, &plain, true)?;
        buf.copy_from_slice(&sealed);
        Ok(())
    }

    /// Writes bytes sealed with `seal` into sealed volume `vol` as they
    /// are (whole blocks; no keys needed). `seal` must be the volume's.
    pub fn write_sealed(&self, vol: u64, offset: u64, data: &[u8], seal: &SealRec) -> Result<()> {
        let (size, bs) = {
            let mut g = self.lock()?;
            g.admit(seal)?;
            let v = g.seal_view(Target::Volume(vol))?;
            let Some(have) = &v.seal else {
                return Err(Error::Invalid(format!(
                    "volume {} is not sealed: write sealed bytes only into a sealed volume",
                    v.name
                )));
            };
            if have.id() != seal.id() {
                return Err(Error::Invalid(format!(
                    "volume {}: the data is sealed with another key/nonce: seal {}, volume \
                     holds {}",
                    v.name,
                    seal.id(),
                    have.id()
                )));
            }
            (v.size, v.bs as u32)
        };
        pipeline::check_aligned(bs as u64, size, offset, data.len() as u64)?;
        let len = data.len() as u64;
        let Some((_g, bs_now, sealed_now)) = self.begin_write_sealed(vol, offset, len)? else {
            return Ok(());
        };
        if bs_now != bs || !sealed_now {
            return Err(Error::Busy(format!("volume {vol} changed during a write")));
        }
        self.write_locked(vol, offset, Some(data), len, bs, false)
    }

    /// Unseals `sealed` (whole blocks at `offset`, sealed with `seal` for a
    /// volume of this volume's block size) and writes the plain bytes into
    /// unsealed volume `vol`: a raw replica sent back to the pool that
    /// holds its key. The keys of `seal` must be loaded or this pool's own.
    pub fn write_unsealing(
        &self,
        vol: u64,
        offset: u64,
        sealed: &[u8],
        seal: &SealRec,
    ) -> Result<()> {
        let (v, keys) = {
            let mut g = self.lock()?;
            g.admit(seal)?;
            let v = g.seal_view(Target::Volume(vol))?;
            if v.seal.is_some() {
                return Err(Error::Invalid(format!(
                    "volume {} is sealed: write sealed bytes into it with write_sealed",
                    v.name
                )));
            }
            // End-to-end encrypted data stays encrypted at rest.
            if v.policy.encryption.is_none() {
                return Err(Error::Invalid(format!(
                    "volume {} is not encrypted: unsealed data would be stored in the clear; \
                     unseal only into an encrypted volume",
                    v.name
                )));
            }
            if seal.block_size as u64 != v.bs {
                return Err(Error::Invalid(format!(
                    "volume {} has blocks of {} bytes and the data is sealed in blocks of {}",
                    v.name, v.bs, seal.block_size
                )));
            }
            if self.keys.is_none() {
                return Err(Error::KeyRequired);
            }
            (v, g.seal_keys(seal)?)
        };
        let plain = pipeline::seal_range(&keys, seal, v.bs, v.size, offset, sealed, false)?;
        self.write(vol, offset, &plain)
    }

    /// [`Pool::read`] of a sealed target: its blocks read as stored and
    /// unsealed.
    pub(super) fn read_unsealing(
        &self,
        t: Target,
        size: u64,
        bs: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let (seal, keys) = self.target_seal_keys(t)?;
        let bs64 = bs as u64;
        let end = offset + buf.len() as u64;
        // A bounded window at a time: a large read costs twice its window,
        // not twice its length.
        let step = (8u64 << 20).max(bs64);
        let mut lo = offset / bs64 * bs64;
        while lo < end {
            let hi = (lo + step).min(end.div_ceil(bs64) * bs64).min(size);
            let mut raw = vec![0u8; (hi - lo) as usize];
            self.read_in(t, bs, lo, &mut raw)?;
            let plain = pipeline::seal_range(&keys, &seal, bs64, size, lo, &raw, false)?;
            let (a, z) = (lo.max(offset), hi.min(end));
            buf[(a - offset) as usize..(z - offset) as usize]
                .copy_from_slice(&plain[(a - lo) as usize..(z - lo) as usize]);
            lo = hi;
        }
        Ok(())
    }

    /// [`Pool::write`] (or zeroing with `data` None) of a sealed volume;
    /// the caller holds the range lock. Blocks the write covers in part
    /// are unsealed, patched and sealed again; whole blocks of zeros need
    /// no keys (zeros seal to zeros). `keep_zeros` as for `write_locked`.
    pub(super) fn write_sealing(
        &self,
        vol: u64,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        bs: u32,
        keep_zeros: bool,
    ) -> Result<()> {
        let t = Target::Volume(vol);
        let bs64 = bs as u64;
        let end = offset + len;
        let size = self.geometry(t)?.0;
        check_range(offset, len, size)?;
        let whole = offset.is_multiple_of(bs64) && (end.is_multiple_of(bs64) || end == size);
        if data.is_none() && whole {
            let zeros = keep_zeros.then(|| vec![0u8; len as usize]);
            return self.write_locked(vol, offset, zeros.as_deref(), len, bs, keep_zeros);
        }
        let (seal, keys) = self.target_seal_keys(t)?;
        let lo = offset / bs64 * bs64;
        let hi = end.div_ceil(bs64).saturating_mul(bs64).min(size);
        let mut plain = vec![0u8; (hi - lo) as usize];
        // The current contents of the blocks covered in part.
        let first_end = (lo + bs64).min(size);
        if offset > lo || end < first_end {
            self.read_unsealing(t, size, bs, lo, &mut plain[..(first_end - lo) as usize])?;
        }
        let last = (hi - 1) / bs64 * bs64;
        if last > lo && end < hi {
            let at = (last - lo) as usize;
            self.read_unsealing(t, size, bs, last, &mut plain[at..])?;
        }
        let dst = &mut plain[(offset - lo) as usize..(end - lo) as usize];
        match data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        let sealed = pipeline::seal_range(&keys, &seal, bs64, size, lo, &plain, true)?;
        self.write_locked(vol, lo, Some(&sealed), hi - lo, bs, keep_zeros)
    }

    /// A sealed target's seal and its keys (`Error::SealKeyRequired` when
    /// they are not loaded; `Error::KeyRequired` for a seal of this pool's
    /// key in a pool opened without it).
    fn target_seal_keys(&self, t: Target) -> Result<(SealRec, Arc<Keys>)> {
        let g = self.lock()?;
        let seal = g
            .seal_view(t)?
            .seal
            .ok_or_else(|| Error::Invalid("the target is not sealed".into()))?;
        let keys = g.seal_keys(&seal)?;
        Ok((seal, keys))
    }
}
