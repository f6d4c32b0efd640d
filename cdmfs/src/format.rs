//! On-disk structures: superblock ring, B+tree nodes and their value types.
//! All integers are little-endian. See docs/on-disk-format.md.

use crate::error::{Error, Result};

/// Allocation unit of the pool: every address is a block number of this size.
pub const UNIT: u64 = 4096;
/// Size of a B+tree node (one unit).
pub const NODE_SIZE: usize = 4096;
/// Number of superblock slots in the ring (blocks 0..SB_SLOTS).
pub const SB_SLOTS: u64 = 4;
/// Blocks reserved at the start of the pool (superblock ring and room for labels).
pub const RESERVED_BLOCKS: u64 = 256;
/// Bytes of a superblock that are checksummed (fits in one 512-byte sector,
/// which disks write atomically).
pub const SB_BYTES: usize = 512;
pub const SB_MAGIC: &[u8; 8] = b"CDMFSPL\0";
/// 2: volume trees may hold sub-block pieces ([`PieceKey`]). A version-1
/// pool is a version-2 pool without pieces: it opens as is and its next
/// commit writes version 2.
pub const FORMAT_VERSION: u32 = 2;
pub const NODE_MAGIC: u32 = u32::from_le_bytes(*b"CDMN");
pub const NODE_HDR: usize = 32;
/// No pointer may name a block at or past this: byte offsets of every block
/// (and of everything after it) then fit in a u64. Values beyond it in a
/// node are rejected as corrupt even if its checksum matches.
pub const MAX_BLOCK_ADDR: u64 = 1 << 51;
/// Extents and refcount keys at `TIER_BASE + id` name an object moved to
/// the object-store tier (`pool/tier.rs`): `id` is its entry in the tier
/// map, never a pool block. Just past the pool-block range, so byte
/// arithmetic on any extent address stays far from overflow.
pub const TIER_BASE: u64 = MAX_BLOCK_ADDR;
/// Tier ids stay below this (2^40 objects).
pub const MAX_TIER_ID: u64 = 1 << 40;
/// Packs are numbered below this, and an object lies below this offset in
/// its pack (a checksum-valid but impossible entry must not overflow a
/// reader's arithmetic).
pub const MAX_PACKS: u64 = 1 << 48;
pub const MAX_PACK_OFFSET: u64 = 1 << 40;
/// Incompatible feature flag: the pool has a tier map (older code must
/// not open it).
pub const INCOMPAT_TIER: u32 = 1;

/// Whether `addr` names a tiered object rather than a pool block.
pub fn is_tier_addr(addr: u64) -> bool {
    (TIER_BASE..TIER_BASE + MAX_TIER_ID).contains(&addr)
}

/// Volume block sizes the engine accepts.
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub(crate) fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn rd_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn wr_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// A pointer to a node or blob with the checksum of what it points to
/// (parents carry their children's checksums: a Merkle tree).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ptr {
    pub addr: u64,
    pub csum: u32,
}

impl Ptr {
    pub const NULL: Ptr = Ptr { addr: 0, csum: 0 };
    pub fn is_null(&self) -> bool {
        self.addr == 0
    }
}

/// The superblock: points at the catalog and refcount trees of one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub uuid: [u8; 16],
    pub generation: u64,
    pub total_blocks: u64,
    /// Upper bound of entries per node (0 = as many as fit); small values
    /// make deep trees for tests.
    pub max_fanout: u32,
    pub catalog: Ptr,
    pub refcounts: Ptr,
    pub next_id: u64,
    pub commit_time_ns: u64,
    /// Dedup index and its reverse map (null in pools that never deduplicated).
    pub dedup: Ptr,
    pub dedup_rev: Ptr,
    /// The intent log's first record slot for this generation: block and
    /// length in blocks (0, 0: none; see `pool/intent.rs`).
    pub log_head: u64,
    pub log_blocks: u32,
    /// The tier map (null when nothing was ever tiered), the next tier id
    /// and the next pack number (`pool/tier.rs`).
    pub tier: Ptr,
    pub next_tier_id: u64,
    pub next_pack: u64,
}

impl Superblock {
    pub fn encode(&self) -> [u8; SB_BYTES] {
        let mut b = [0u8; SB_BYTES];
        b[0..8].copy_from_slice(SB_MAGIC);
        wr_u32(&mut b, 8, self.version);
        // Incompatible feature flags: a tiered pool's extents name objects
        // that older code would take for corruption.
        let tiered = !self.tier.is_null() || self.next_tier_id > 0 || self.next_pack > 0;
        wr_u32(&mut b, 12, if tiered { INCOMPAT_TIER } else { 0 });
        b[16..32].copy_from_slice(&self.uuid);
        wr_u64(&mut b, 32, self.generation);
        wr_u64(&mut b, 40, self.total_blocks);
        wr_u32(&mut b, 48, UNIT as u32);
        wr_u32(&mut b, 52, NODE_SIZE as u32);
        wr_u32(&mut b, 56, self.max_fanout);
        wr_u64(&mut b, 64, self.catalog.addr);
        wr_u32(&mut b, 72, self.catalog.csum);
        wr_u64(&mut b, 80, self.refcounts.addr);
        wr_u32(&mut b, 88, self.refcounts.csum);
        wr_u64(&mut b, 96, self.next_id);
        wr_u64(&mut b, 104, self.commit_time_ns);
        wr_u64(&mut b, 112, self.dedup.addr);
        wr_u32(&mut b, 120, self.dedup.csum);
        wr_u64(&mut b, 124, self.dedup_rev.addr);
        wr_u32(&mut b, 132, self.dedup_rev.csum);
        wr_u64(&mut b, 136, self.log_head);
        wr_u32(&mut b, 144, self.log_blocks);
        wr_u64(&mut b, 148, self.tier.addr);
        wr_u32(&mut b, 156, self.tier.csum);
        wr_u64(&mut b, 160, self.next_tier_id);
        wr_u64(&mut b, 168, self.next_pack);
        let c = crc(&b[..SB_BYTES - 4]);
        wr_u32(&mut b, SB_BYTES - 4, c);
        b
    }

    /// Decodes one slot. `Ok(None)` for a slot that was never written.
    pub fn decode(b: &[u8]) -> std::result::Result<Option<Superblock>, SbError> {
        if b.len() < SB_BYTES {
            return Err(SbError::Torn);
        }
        if b[..SB_BYTES].iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if &b[0..8] != SB_MAGIC {
            return Err(SbError::Magic);
        }
        if crc(&b[..SB_BYTES - 4]) != rd_u32(b, SB_BYTES - 4) {
            return Err(SbError::Torn);
        }
        let version = rd_u32(b, 8);
        if version > FORMAT_VERSION || rd_u32(b, 12) & !INCOMPAT_TIER != 0 {
            return Err(SbError::Version(version));
        }
        if rd_u32(b, 48) as u64 != UNIT || rd_u32(b, 52) as usize != NODE_SIZE {
            return Err(SbError::Torn);
        }
        if rd_u64(b, 40) >= MAX_BLOCK_ADDR
            || rd_u64(b, 136) >= MAX_BLOCK_ADDR
            || rd_u64(b, 148) >= MAX_BLOCK_ADDR
            || rd_u64(b, 160) > MAX_TIER_ID
            || rd_u64(b, 168) > MAX_PACKS
        {
            return Err(SbError::Torn);
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(Some(Superblock {
            version,
            uuid,
            generation: rd_u64(b, 32),
            total_blocks: rd_u64(b, 40),
            max_fanout: rd_u32(b, 56),
            catalog: Ptr {
                addr: rd_u64(b, 64),
                csum: rd_u32(b, 72),
            },
            refcounts: Ptr {
                addr: rd_u64(b, 80),
                csum: rd_u32(b, 88),
            },
            next_id: rd_u64(b, 96),
            commit_time_ns: rd_u64(b, 104),
            dedup: Ptr {
                addr: rd_u64(b, 112),
                csum: rd_u32(b, 120),
            },
            dedup_rev: Ptr {
                addr: rd_u64(b, 124),
                csum: rd_u32(b, 132),
            },
            log_head: rd_u64(b, 136),
            log_blocks: rd_u32(b, 144),
            tier: Ptr {
                addr: rd_u64(b, 148),
                csum: rd_u32(b, 156),
            },
            next_tier_id: rd_u64(b, 160),
            next_pack: rd_u64(b, 168),
        }))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SbError {
    Magic,
    Torn,
    Version(u32),
}

/// Which tree a node belongs to. Volume trees are shared (refcounted,
/// snapshotted, cloned); the catalog and refcount trees are private to the
/// pool and shadowed without refcounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TreeKind {
    /// logical block -> [`Extent`]
    Volume = 1,
    /// pool block -> [`RcVal`]
    Refcount = 2,
    /// record key -> [`Ptr`] to a blob
    Catalog = 3,
    /// fingerprint (first 8 bytes) -> [`DedupVal`]
    Dedup = 4,
    /// (object block << 12 | slot) -> fingerprint key, to drop index
    /// entries when an object is freed
    DedupRev = 5,
    /// tier id -> [`TierEnt`]: where a tiered object lives
    Tier = 6,
}

impl TreeKind {
    pub fn from_u8(v: u8) -> Option<TreeKind> {
        match v {
            1 => Some(TreeKind::Volume),
            2 => Some(TreeKind::Refcount),
            3 => Some(TreeKind::Catalog),
            4 => Some(TreeKind::Dedup),
            5 => Some(TreeKind::DedupRev),
            6 => Some(TreeKind::Tier),
            _ => None,
        }
    }
    /// Size of a leaf value.
    pub fn val_size(self) -> usize {
        match self {
            TreeKind::Volume => Extent::SIZE,
            TreeKind::Refcount => RcVal::SIZE,
            TreeKind::Catalog => PTR_SIZE,
            TreeKind::Dedup => DedupVal::SIZE,
            TreeKind::DedupRev => 8,
            TreeKind::Tier => TierEnt::SIZE,
        }
    }
    pub fn shared(self) -> bool {
        self == TreeKind::Volume
    }
    pub fn name(self) -> &'static str {
        match self {
            TreeKind::Volume => "volume tree node",
            TreeKind::Refcount => "refcount tree node",
            TreeKind::Catalog => "catalog tree node",
            TreeKind::Dedup => "dedup index node",
            TreeKind::DedupRev => "dedup reverse index node",
            TreeKind::Tier => "tier map node",
        }
    }
}

pub const PTR_SIZE: usize = 12;

pub fn enc_ptr(p: Ptr) -> [u8; PTR_SIZE] {
    let mut b = [0u8; PTR_SIZE];
    wr_u64(&mut b, 0, p.addr);
    wr_u32(&mut b, 8, p.csum);
    b
}
pub fn dec_ptr(b: &[u8]) -> Ptr {
    Ptr {
        addr: rd_u64(b, 0),
        csum: rd_u32(b, 8),
    }
}

/// Extent flags: 0 for a plain extent; the data pipeline (compression,
/// encryption, dedup, packs, frames) sets the others.
pub mod flags {
    pub const COMPRESSED: u16 = 1 << 0;
    pub const ENCRYPTED: u16 = 1 << 1;
    pub const DEDUP: u16 = 1 << 2;
    /// The bytes live inside a pack (an object holding many compressed
    /// chunks): at byte `aux * 16` from the object's first block.
    pub const PACKED: u16 = 1 << 3;
    /// Bits 8–9: the cipher of an encrypted extent (0 AES-256-XTS,
    /// 1 AES-128-XTS, 2 SM4-XTS).
    pub const CIPHER_SHIFT: u16 = 8;
    pub const CIPHER_MASK: u16 = 3 << 8;
    /// The stored bytes are one zstd frame holding several consecutive
    /// chunks; this one is number `(flags & FRAME_MASK) >> FRAME_SHIFT`.
    /// Always with COMPRESSED and PACKED.
    pub const FRAMED: u16 = 1 << 4;
    pub const FRAME_SHIFT: u16 = 10;
    pub const FRAME_MASK: u16 = 0x3f << 10;
    pub const KNOWN: u16 =
        COMPRESSED | ENCRYPTED | DEDUP | PACKED | FRAMED | CIPHER_MASK | FRAME_MASK;
}

/// Uncompressed bytes compressed together as one frame (chunks of small
/// blocks compress far better together: docs/design.md).
pub const FRAME_BYTES: usize = 128 << 10;
/// Most chunks in one frame (the index has 6 bits).
pub const MAX_FRAME_CHUNKS: usize = 64;

/// Largest pack: 1 MiB, so a chunk's offset (in 16-byte units) fits `aux`.
pub const MAX_PACK: u64 = 1 << 20;
/// Most chunks in one pack (the dedup reverse index keys a slot in 12 bits).
pub const MAX_PACK_CHUNKS: usize = 4096;

/// A leaf value of a volume tree: where one logical block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First pool block of the stored bytes.
    pub addr: u64,
    /// Stored length in bytes (after compression/encryption); allocated
    /// length is this rounded up to [`UNIT`].
    pub stored_len: u32,
    /// crc32c of the stored bytes.
    pub csum: u32,
    pub flags: u16,
    /// Packed extents: offset of the chunk in its pack in 16-byte units;
    /// 0 otherwise.
    pub aux: u16,
}

impl Extent {
    pub const SIZE: usize = 20;
    /// Whether the stored bytes are in the object-store tier (`addr` is
    /// `TIER_BASE` + a tier id).
    pub fn is_tiered(&self) -> bool {
        is_tier_addr(self.addr)
    }
    /// Offset of the stored bytes inside their object.
    pub fn offset_in_object(&self) -> u64 {
        if self.packed() {
            self.aux as u64 * 16
        } else {
            0
        }
    }
    /// Blocks of a plain (unpacked) extent.
    pub fn blocks(&self) -> u32 {
        self.stored_len.div_ceil(UNIT as u32)
    }
    pub fn packed(&self) -> bool {
        self.flags & flags::PACKED != 0
    }
    /// Pool byte offset of the stored bytes.
    pub fn byte_offset(&self) -> u64 {
        self.addr * UNIT
            + if self.packed() {
                self.aux as u64 * 16
            } else {
                0
            }
    }
    /// Blocks the object at `addr` must have at least to hold these bytes.
    pub fn min_object_blocks(&self) -> u32 {
        let end = if self.packed() {
            self.aux as u64 * 16
        } else {
            0
        } + self.stored_len as u64;
        end.div_ceil(UNIT) as u32
    }
    /// Index of the chunk in its frame (0 for unframed extents).
    pub fn frame_index(&self) -> usize {
        ((self.flags & flags::FRAME_MASK) >> flags::FRAME_SHIFT) as usize
    }
    /// Stored bytes this extent accounts for (a packed chunk: its bytes
    /// rounded to the 16-byte slot; a plain extent: its whole blocks).
    pub fn phys_bytes(&self) -> u64 {
        if self.packed() {
            (self.stored_len as u64).div_ceil(16) * 16
        } else {
            self.blocks() as u64 * UNIT
        }
    }
    /// Whether the stored bytes are the block as is (not compressed,
    /// encrypted or packed; a deduplicated plain extent is plain).
    pub fn is_plain(&self) -> bool {
        self.flags & (flags::COMPRESSED | flags::ENCRYPTED | flags::PACKED) == 0
    }
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        wr_u64(&mut b, 0, self.addr);
        wr_u32(&mut b, 8, self.stored_len);
        wr_u32(&mut b, 12, self.csum);
        wr_u16(&mut b, 16, self.flags);
        wr_u16(&mut b, 18, self.aux);
        b
    }
    pub fn decode(b: &[u8]) -> Extent {
        Extent {
            addr: rd_u64(b, 0),
            stored_len: rd_u32(b, 8),
            csum: rd_u32(b, 12),
            flags: rd_u16(b, 16),
            aux: rd_u16(b, 18),
        }
    }
}

/// The key of a sub-block piece in a volume tree: part of a volume block,
/// in 4 KiB units, written after the block's whole-block extent and read
/// over it (see `on-disk-format.md`, "Pieces"). Piece keys have the top
/// bit set, so all of a tree's pieces sort after its whole-block keys and
/// the pieces of one block are contiguous and ordered by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceKey {
    /// Logical block of the volume.
    pub block: u64,
    /// First 4 KiB unit within the block.
    pub start: u32,
    /// Units covered, at least 1.
    pub units: u32,
}

pub const PIECE_BIT: u64 = 1 << 63;
/// Logical blocks a piece key can name (volumes hold at most 2^60 bytes
/// and pieces exist only in blocks of 8 KiB or more).
const PIECE_MAX_BLOCK: u64 = 1 << 47;

impl PieceKey {
    pub fn encode(&self) -> u64 {
        PIECE_BIT | self.block << 16 | (self.start as u64) << 8 | (self.units as u64 - 1)
    }
    /// The piece a key names, or None for a whole-block key.
    pub fn decode(k: u64) -> Option<PieceKey> {
        (k & PIECE_BIT != 0).then(|| PieceKey {
            block: (k & !PIECE_BIT) >> 16,
            start: ((k >> 8) & 0xff) as u32,
            units: (k & 0xff) as u32 + 1,
        })
    }
    /// The first key of block `b`'s pieces (the range of blocks `b0..b1`
    /// is `first(b0)..first(b1)`).
    pub fn first(b: u64) -> u64 {
        PIECE_BIT | b.min(PIECE_MAX_BLOCK) << 16
    }
    pub fn end(&self) -> u32 {
        self.start + self.units
    }
    /// Bytes of the piece's chunk.
    pub fn bytes(&self) -> u64 {
        self.units as u64 * UNIT
    }
    /// Where the piece starts in the volume, for a block size.
    pub fn offset(&self, bs: u32) -> u64 {
        self.block * bs as u64 + self.start as u64 * UNIT
    }
    fn sane(k: u64) -> bool {
        PieceKey::decode(k)
            .is_some_and(|p| p.block < PIECE_MAX_BLOCK && p.end() <= MAX_BLOCK_SIZE / UNIT as u32)
    }
}

/// Where a volume-tree key's data starts in the volume, and how many bytes
/// its chunk holds: a whole block, or a piece.
pub fn volume_key_span(k: u64, bs: u32) -> (u64, u64) {
    match PieceKey::decode(k) {
        Some(p) => (p.offset(bs), p.bytes()),
        None => (k.saturating_mul(bs as u64), bs as u64),
    }
}

impl Extent {
    /// Whether every field is possible (what node decoding checks).
    pub fn sane(&self) -> bool {
        extent_sane(self)
    }
}

fn extent_sane(e: &Extent) -> bool {
    ((e.addr >= RESERVED_BLOCKS && e.addr < MAX_BLOCK_ADDR) || is_tier_addr(e.addr))
        && e.stored_len > 0
        && e.stored_len <= MAX_BLOCK_SIZE
        && e.flags & !flags::KNOWN == 0
        && (e.packed() || e.aux == 0)
        && (!e.packed() || e.aux as u64 * 16 + e.stored_len as u64 <= MAX_PACK)
        && (e.flags & flags::ENCRYPTED != 0 || e.flags & flags::CIPHER_MASK == 0)
        && if e.flags & flags::FRAMED != 0 {
            e.flags & (flags::COMPRESSED | flags::PACKED) == flags::COMPRESSED | flags::PACKED
        } else {
            e.flags & flags::FRAME_MASK == 0
        }
}

/// A leaf value of the dedup index: the rest of the 32-byte fingerprint
/// (the key holds its first 8 bytes) and the extent holding the chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupVal {
    pub rest: [u8; 24],
    pub ext: Extent,
}

impl DedupVal {
    pub const SIZE: usize = 24 + Extent::SIZE;
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..24].copy_from_slice(&self.rest);
        b[24..].copy_from_slice(&self.ext.encode());
        b
    }
    pub fn decode(b: &[u8]) -> DedupVal {
        let mut rest = [0u8; 24];
        rest.copy_from_slice(&b[..24]);
        DedupVal {
            rest,
            ext: Extent::decode(&b[24..]),
        }
    }
    /// Splits a fingerprint into the index key and the rest.
    pub fn split(fp: &[u8; 32]) -> (u64, [u8; 24]) {
        let mut rest = [0u8; 24];
        rest.copy_from_slice(&fp[8..]);
        (rd_u64(fp, 0), rest)
    }
}

/// A leaf value of the tier map: one tiered object (what was a pool
/// object of `len` bytes at block `orig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierEnt {
    /// Pack number (object `packs/{pack:016x}` in the store).
    pub pack: u64,
    /// Byte offset of the object in its pack.
    pub offset: u64,
    /// The object's bytes (its blocks × 4 KiB).
    pub len: u32,
    /// The pool block it had: encrypted chunks keep the tweak it gave them.
    pub orig: u64,
    /// A recalled copy on local storage (first block), or 0.
    pub local: u64,
    /// crc32c of the object's bytes as uploaded.
    pub crc: u32,
}

impl TierEnt {
    pub const SIZE: usize = 40;
    pub fn blocks(&self) -> u64 {
        (self.len as u64).div_ceil(UNIT)
    }
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        wr_u64(&mut b, 0, self.pack);
        wr_u64(&mut b, 8, self.offset);
        wr_u32(&mut b, 16, self.len);
        wr_u64(&mut b, 20, self.orig);
        wr_u64(&mut b, 28, self.local);
        wr_u32(&mut b, 36, self.crc);
        b
    }
    pub fn decode(b: &[u8]) -> TierEnt {
        TierEnt {
            pack: rd_u64(b, 0),
            offset: rd_u64(b, 8),
            len: rd_u32(b, 16),
            orig: rd_u64(b, 20),
            local: rd_u64(b, 28),
            crc: rd_u32(b, 36),
        }
    }
}

/// A leaf value of the refcount tree: an allocated object and its references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RcVal {
    pub blocks: u32,
    pub refs: u32,
}

impl RcVal {
    pub const SIZE: usize = 8;
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        wr_u32(&mut b, 0, self.blocks);
        wr_u32(&mut b, 4, self.refs);
        b
    }
    pub fn decode(b: &[u8]) -> RcVal {
        RcVal {
            blocks: rd_u32(b, 0),
            refs: rd_u32(b, 4),
        }
    }
}

/// A B+tree node in memory. Leaves hold `kind.val_size()` bytes per key;
/// internal nodes hold a [`Ptr`] per key, the key being the smallest key
/// reachable through that child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: TreeKind,
    pub level: u8,
    pub keys: Vec<u64>,
    pub vals: Vec<u8>,
}

impl Node {
    pub fn new(kind: TreeKind, level: u8) -> Node {
        Node {
            kind,
            level,
            keys: Vec::new(),
            vals: Vec::new(),
        }
    }
    pub fn is_leaf(&self) -> bool {
        self.level == 0
    }
    pub fn stride(&self) -> usize {
        if self.is_leaf() {
            self.kind.val_size()
        } else {
            PTR_SIZE
        }
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    pub fn val(&self, i: usize) -> &[u8] {
        let s = self.stride();
        &self.vals[i * s..(i + 1) * s]
    }
    pub fn set_val(&mut self, i: usize, v: &[u8]) {
        let s = self.stride();
        self.vals[i * s..(i + 1) * s].copy_from_slice(v);
    }
    pub fn child(&self, i: usize) -> Ptr {
        dec_ptr(self.val(i))
    }
    pub fn set_child(&mut self, i: usize, p: Ptr) {
        self.set_val(i, &enc_ptr(p));
    }
    pub fn insert_at(&mut self, i: usize, key: u64, v: &[u8]) {
        let s = self.stride();
        self.keys.insert(i, key);
        self.vals.splice(i * s..i * s, v.iter().copied());
    }
    pub fn remove_at(&mut self, i: usize) {
        let s = self.stride();
        self.keys.remove(i);
        self.vals.drain(i * s..(i + 1) * s);
    }
    /// Moves entries `at..` into a new node.
    pub fn split_off(&mut self, at: usize) -> Node {
        let s = self.stride();
        Node {
            kind: self.kind,
            level: self.level,
            keys: self.keys.split_off(at),
            vals: self.vals.split_off(at * s),
        }
    }
    /// Index of the child whose range holds `key` (internal nodes).
    pub fn child_index(&self, key: u64) -> usize {
        match self.keys.binary_search(&key) {
            Ok(i) => i,
            Err(0) => 0,
            Err(i) => i - 1,
        }
    }

    /// Most entries a node of this kind and level can hold.
    pub fn capacity(kind: TreeKind, level: u8, max_fanout: u32) -> usize {
        let stride = if level == 0 {
            kind.val_size()
        } else {
            PTR_SIZE
        };
        let fit = (NODE_SIZE - NODE_HDR) / (8 + stride);
        if max_fanout >= 3 {
            fit.min(max_fanout as usize)
        } else {
            fit
        }
    }

    /// Serializes the node for pool block `addr`; returns the bytes and their checksum.
    pub fn encode(&self, addr: u64, generation: u64) -> (Vec<u8>, u32) {
        let mut b = vec![0u8; NODE_SIZE];
        wr_u32(&mut b, 0, NODE_MAGIC);
        wr_u64(&mut b, 8, addr);
        wr_u64(&mut b, 16, generation);
        b[24] = self.kind as u8;
        b[25] = self.level;
        wr_u16(&mut b, 26, self.keys.len() as u16);
        let mut o = NODE_HDR;
        for k in &self.keys {
            wr_u64(&mut b, o, *k);
            o += 8;
        }
        b[o..o + self.vals.len()].copy_from_slice(&self.vals);
        let c = crc(&b[8..]);
        wr_u32(&mut b, 4, c);
        (b, c)
    }

    /// Parses and verifies a node read from pool block `addr`, whose parent
    /// recorded checksum `expect`.
    pub fn decode(b: &[u8], addr: u64, expect: u32) -> Result<Node> {
        let bad = |why: &str| Error::Corrupt(format!("node at pool block {addr}: {why}"));
        if b.len() != NODE_SIZE {
            return Err(bad("short read"));
        }
        let c = crc(&b[8..]);
        if rd_u32(b, 0) != NODE_MAGIC || c != rd_u32(b, 4) || c != expect {
            let what = TreeKind::from_u8(b[24])
                .map(|k| k.name())
                .unwrap_or("tree node");
            return Err(Error::MetadataChecksum { what, block: addr });
        }
        if rd_u64(b, 8) != addr {
            return Err(bad("misdirected write (node records another address)"));
        }
        let kind = TreeKind::from_u8(b[24]).ok_or_else(|| bad("unknown tree kind"))?;
        let level = b[25];
        let n = rd_u16(b, 26) as usize;
        let stride = if level == 0 {
            kind.val_size()
        } else {
            PTR_SIZE
        };
        if level > 32 || NODE_HDR + n * (8 + stride) > NODE_SIZE {
            return Err(bad("entry count or level out of bounds"));
        }
        let mut keys = Vec::with_capacity(n);
        let mut o = NODE_HDR;
        for _ in 0..n {
            keys.push(rd_u64(b, o));
            o += 8;
        }
        if keys.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("keys out of order"));
        }
        let vals = b[o..o + n * stride].to_vec();
        let node = Node {
            kind,
            level,
            keys,
            vals,
        };
        // A checksum proves the bytes are what was written, not that they
        // are sane: check every value a reader will compute with.
        for i in 0..n {
            let v = node.val(i);
            let ok = if level > 0 {
                let p = dec_ptr(v);
                p.addr >= RESERVED_BLOCKS && p.addr < MAX_BLOCK_ADDR
            } else {
                match kind {
                    TreeKind::Volume => {
                        extent_sane(&Extent::decode(v))
                            && (node.keys[i] < MAX_BLOCK_ADDR || PieceKey::sane(node.keys[i]))
                    }
                    TreeKind::Dedup => extent_sane(&DedupVal::decode(v).ext),
                    TreeKind::DedupRev => true,
                    TreeKind::Refcount => {
                        let r = RcVal::decode(v);
                        r.blocks > 0
                            && r.refs > 0
                            && (node.keys[i] < MAX_BLOCK_ADDR || is_tier_addr(node.keys[i]))
                    }
                    TreeKind::Tier => {
                        let t = TierEnt::decode(v);
                        node.keys[i] < MAX_TIER_ID
                            && t.len > 0
                            && t.offset < MAX_PACK_OFFSET
                            && t.pack < MAX_PACKS
                            && t.orig >= RESERVED_BLOCKS
                            && t.orig < MAX_BLOCK_ADDR
                            && (t.local == 0
                                || (t.local >= RESERVED_BLOCKS && t.local < MAX_BLOCK_ADDR))
                    }
                    TreeKind::Catalog => {
                        let p = dec_ptr(v);
                        p.addr >= RESERVED_BLOCKS && p.addr < MAX_BLOCK_ADDR
                    }
                }
            };
            if !ok {
                return Err(bad(&format!("entry {i} holds an impossible value")));
            }
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrip_and_damage() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            generation: 42,
            total_blocks: 1 << 20,
            max_fanout: 0,
            catalog: Ptr { addr: 300, csum: 5 },
            refcounts: Ptr { addr: 301, csum: 6 },
            next_id: 9,
            commit_time_ns: 1,
            dedup: Ptr { addr: 302, csum: 7 },
            dedup_rev: Ptr { addr: 303, csum: 8 },
            log_head: 0,
            log_blocks: 0,
            tier: Ptr { addr: 304, csum: 9 },
            next_tier_id: 10,
            next_pack: 2,
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), Some(sb.clone()));
        // A tiered pool says so in its incompatible flags; an unknown flag
        // is refused.
        assert_eq!(rd_u32(&b, 12), INCOMPAT_TIER);
        let mut f = b;
        wr_u32(&mut f, 12, INCOMPAT_TIER | 2);
        let c = crc(&f[..SB_BYTES - 4]);
        wr_u32(&mut f, SB_BYTES - 4, c);
        assert_eq!(
            Superblock::decode(&f),
            Err(SbError::Version(FORMAT_VERSION))
        );
        let mut t = b;
        t[33] ^= 1;
        assert_eq!(Superblock::decode(&t), Err(SbError::Torn));
        let mut m = b;
        m[0] = b'X';
        assert_eq!(Superblock::decode(&m), Err(SbError::Magic));
        assert_eq!(Superblock::decode(&[0u8; SB_BYTES]), Ok(None));
        let mut v = sb.clone();
        v.version = FORMAT_VERSION + 1;
        assert_eq!(
            Superblock::decode(&v.encode()),
            Err(SbError::Version(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn node_roundtrip_and_checks() {
        let mut n = Node::new(TreeKind::Volume, 0);
        for i in 0..10u64 {
            let e = Extent {
                addr: 1000 + i,
                stored_len: 65536,
                csum: i as u32,
                flags: 0,
                aux: 0,
            };
            n.insert_at(i as usize, i * 3, &e.encode());
        }
        let (b, c) = n.encode(77, 3);
        assert_eq!(Node::decode(&b, 77, c).unwrap(), n);
        assert!(matches!(Node::decode(&b, 78, c), Err(Error::Corrupt(_))));
        assert!(matches!(
            Node::decode(&b, 77, c ^ 1),
            Err(Error::MetadataChecksum { .. })
        ));
        let mut d = b.clone();
        d[100] ^= 0x10;
        assert!(matches!(
            Node::decode(&d, 77, c),
            Err(Error::MetadataChecksum { .. })
        ));
    }

    #[test]
    fn valid_checksum_does_not_make_values_sane() {
        for bad in [
            Extent {
                addr: 3,
                stored_len: 4096,
                csum: 0,
                flags: 0,
                aux: 0,
            },
            // Past the pool-block range and past the tier ids.
            Extent {
                addr: TIER_BASE + MAX_TIER_ID,
                stored_len: 4096,
                csum: 0,
                flags: 0,
                aux: 0,
            },
            Extent {
                addr: 1000,
                stored_len: 0,
                csum: 0,
                flags: 0,
                aux: 0,
            },
            Extent {
                addr: 1000,
                stored_len: MAX_BLOCK_SIZE + 1,
                csum: 0,
                flags: 0,
                aux: 0,
            },
        ] {
            let mut n = Node::new(TreeKind::Volume, 0);
            n.insert_at(0, 1, &bad.encode());
            let (b, c) = n.encode(500, 1);
            assert!(
                matches!(Node::decode(&b, 500, c), Err(Error::Corrupt(_))),
                "{bad:?} accepted"
            );
        }
        let mut n = Node::new(TreeKind::Volume, 1);
        n.insert_at(
            0,
            0,
            &enc_ptr(Ptr {
                addr: u64::MAX,
                csum: 0,
            }),
        );
        let (b, c) = n.encode(500, 1);
        assert!(matches!(Node::decode(&b, 500, c), Err(Error::Corrupt(_))));
    }

    #[test]
    fn capacities() {
        assert_eq!(Node::capacity(TreeKind::Volume, 0, 0), 145);
        assert_eq!(Node::capacity(TreeKind::Volume, 1, 0), 203);
        assert_eq!(Node::capacity(TreeKind::Refcount, 0, 0), 254);
        assert_eq!(Node::capacity(TreeKind::Volume, 0, 4), 4);
    }
}
