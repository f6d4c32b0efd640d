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
}

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
}

/// What sealing needs to know of a target.
struct SealView {
    size: u64,
    bs: u64,
    policy: DataPolicy,
    seal: Option<SealRec>,
    /// The volume lineage: a snapshot's volume, or the volume itself.
    lineage: u64,
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
                    name: self
                        .volumes
                        .get(&s.volume_id)
                        .map(|v| v.name.clone())
                        .unwrap_or_else(|| format!("{}", s.volume_id)),
                })
                .ok_or_else(|| Error::NotFound(format!("snapshot {id}"))),
        }
    }

    /// The keys of `seal`: loaded, or this pool's own.
    fn seal_keys(&self, seal: &SealRec) -> Result<Arc<Keys>> {
        seal.check()?;
        self.seals.get(seal).ok_or(Error::KeyRequired)
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
        seal.check()?;
        check_sealed_size(name, size)?;
        self.create_volume_rec(name, size, block_size, policy, Some(seal))
    }

    /// Loads the keys of `seal` from the key (file or passphrase) of the
    /// pool that sealed it; every volume, snapshot and clone with that
    /// seal becomes readable and writable. A wrong key is
    /// `Error::WrongKey` and changes nothing.
    pub fn load_seal_key(&self, seal: &SealRec, key: &KeySource) -> Result<()> {
        seal.check()?;
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

    /// Whether the keys of seal `seal_id` are in memory: loaded, or this
    /// pool's own for a seal of this pool's key that a volume here has.
    pub fn seal_key_loaded(&self, seal_id: &str) -> bool {
        let Ok(g) = self.lock() else {
            return false;
        };
        if g.seals.loaded.contains_key(seal_id) {
            return true;
        }
        let own = |s: &Option<SealRec>| {
            s.as_ref()
                .is_some_and(|s| g.seals.has(s) && s.id() == seal_id)
        };
        g.volumes.values().any(|v| own(&v.seal)) || g.snapshots.values().any(|s| own(&s.seal))
    }

    /// How target `t` is sent raw: a sealed target's own seal; for a
    /// target encrypted with this pool's key, a seal under this pool's key
    /// whose nonce is derived from the pool and the volume lineage (every
    /// snapshot of a volume seals the same way, so incrementals line up).
    pub fn seal_for_send(&self, t: Target) -> Result<SealRec> {
        let g = self.lock()?;
        let v = g.seal_view(t)?;
        if let Some(seal) = v.seal {
            return Ok(seal);
        }
        let Some(cipher) = v.policy.encryption else {
            return Err(Error::Invalid(format!(
                "volume {} is not encrypted: only encrypted or sealed volumes can be sent raw",
                v.name
            )));
        };
        if self.keys.is_none() {
            return Err(Error::KeyRequired);
        }
        check_sealed_size(&v.name, v.size)?;
        let crypto =
            g.pool_rec.crypto.clone().ok_or_else(|| {
                Error::Corrupt("an encrypted volume in a pool without a key".into())
            })?;
        let mut h = blake3::Hasher::new();
        h.update(b"cdm seal nonce");
        h.update(&g.sb.uuid);
        h.update(&v.lineage.to_le_bytes());
        let d = h.finalize();
        let mut n = [0u8; 8];
        n.copy_from_slice(&d.as_bytes()[..8]);
        Ok(SealRec {
            version: pipeline::SEAL_VERSION,
            crypto,
            cipher,
            nonce: u64::from_le_bytes(n),
        })
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
        let v = self.lock()?.seal_view(t)?;
        pipeline::check_aligned(v.bs, v.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(own) = &v.seal {
            if own.id() != seal.id() {
                return Err(Error::Invalid(format!(
                    "volume {} is sealed with seal {}, not {}",
                    v.name,
                    own.id(),
                    seal.id()
                )));
            }
            return self.read_in(t, v.bs as u32, offset, buf);
        }
        if v.policy.encryption.is_none() {
            return Err(Error::Invalid(format!(
                "volume {} is not encrypted: only encrypted or sealed volumes can be sent raw",
                v.name
            )));
        }
        let keys = self.lock()?.seal_keys(seal)?;
        let mut plain = vec![0u8; buf.len()];
        self.read(t, offset, &mut plain)?;
        let sealed = pipeline::seal_range(&keys, seal, v.bs, v.size, offset, &plain, true)?;
        buf.copy_from_slice(&sealed);
        Ok(())
    }

    /// Writes sealed bytes into sealed volume `vol` as they are (whole
    /// blocks; no keys needed).
    pub fn write_sealed(&self, vol: u64, offset: u64, data: &[u8]) -> Result<()> {
        let (size, bs, sealed) = {
            let g = self.lock()?;
            let tt = g.target(Target::Volume(vol))?;
            (tt.size, tt.block_size, tt.sealed)
        };
        if !sealed {
            return Err(Error::Invalid(format!(
                "volume {vol} is not sealed: write sealed bytes only into a sealed volume"
            )));
        }
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
            let g = self.lock()?;
            let v = g.seal_view(Target::Volume(vol))?;
            if v.seal.is_some() {
                return Err(Error::Invalid(format!(
                    "volume {} is sealed: write sealed bytes into it with write_sealed",
                    v.name
                )));
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

    /// A sealed target's seal and its keys (`Error::KeyRequired` when they
    /// are not loaded).
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
