//! Devices for tests, benches and fuzzers (feature `test-utils`): an
//! in-memory device and a crash-simulating one for power-cut tests.

use std::io;
use std::sync::Mutex;

use cdm_common::lock::lock;

use crate::dev::BlockDev;

/// An in-memory device.
pub struct MemDev {
    data: Mutex<Vec<u8>>,
}

impl MemDev {
    pub fn new(size: usize) -> Self {
        MemDev {
            data: Mutex::new(vec![0; size]),
        }
    }
    pub fn from_image(image: Vec<u8>) -> Self {
        MemDev {
            data: Mutex::new(image),
        }
    }
    /// A copy of the device's bytes.
    pub fn image(&self) -> Vec<u8> {
        lock(&self.data).clone()
    }
    /// Lets a test damage the device.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut lock(&self.data))
    }
}

fn range_check(len: usize, off: u64, n: usize) -> io::Result<usize> {
    let start = usize::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    if start.checked_add(n).is_none_or(|end| end > len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "past end of device",
        ));
    }
    Ok(start)
}

impl BlockDev for MemDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = lock(&self.data);
        let s = range_check(d.len(), off, buf.len())?;
        buf.copy_from_slice(&d[s..s + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut d = lock(&self.data);
        let s = range_check(d.len(), off, buf.len())?;
        d[s..s + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).len() as u64)
    }
}

/// A device that loses power. Writes go to a volatile cache until `sync`;
/// after `cut_after(n)` the power is cut at the n+1-th later write or sync
/// (a cut at a sync leaves that sync's writes unsynced): every later call
/// fails, and [`CrashDev::crash_image`] yields what stable storage holds,
/// with each unsynced write dropped, applied, or torn at 512-byte sector
/// granularity.
pub struct CrashDev {
    st: Mutex<CrashState>,
}

struct CrashState {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    events_left: Option<u64>,
    events: u64,
    dead: bool,
}

/// Sector size within which a write is atomic in the crash model.
pub const SECTOR: usize = 512;

/// What became of one unsynced write in a crash image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    Applied,
    /// Some sectors reached the media: `first` says whether the first did.
    Torn {
        first: bool,
    },
}

/// An unsynced write at the cut and its fate in one crash image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsynced {
    pub off: u64,
    pub len: usize,
    pub fate: Fate,
}

impl CrashDev {
    pub fn new(size: usize) -> Self {
        Self::from_image(vec![0; size])
    }
    /// A device whose stable storage holds `image` (e.g. a crash image, to
    /// cut the recovery from it in turn).
    pub fn from_image(image: Vec<u8>) -> Self {
        CrashDev {
            st: Mutex::new(CrashState {
                durable: image,
                pending: Vec::new(),
                events_left: None,
                events: 0,
                dead: false,
            }),
        }
    }
    /// Cuts the power after `n` more writes or syncs (the n+1-th fails).
    pub fn cut_after(&self, n: u64) {
        lock(&self.st).events_left = Some(n);
    }
    /// Cuts the power now.
    pub fn cut_now(&self) {
        lock(&self.st).dead = true;
    }
    pub fn is_dead(&self) -> bool {
        lock(&self.st).dead
    }
    /// Writes and syncs seen so far (the failing one included).
    pub fn events(&self) -> u64 {
        lock(&self.st).events
    }
    /// What stable storage holds after the cut. `seed` chooses, per sector of
    /// each unsynced write, whether it reached the media.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        self.crash_image_report(seed).0
    }
    /// [`CrashDev::crash_image`] and the fate of each unsynced write, in
    /// write order.
    pub fn crash_image_report(&self, seed: u64) -> (Vec<u8>, Vec<Unsynced>) {
        let st = lock(&self.st);
        let mut img = st.durable.clone();
        let mut x = seed | 1;
        let mut rnd = move || {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let mut fates = Vec::with_capacity(st.pending.len());
        for (off, data) in &st.pending {
            let mode = rnd() % 3; // 0 drop, 1 apply, 2 tear
            let mut fate = match mode {
                0 => Fate::Dropped,
                1 => Fate::Applied,
                _ => Fate::Torn { first: false },
            };
            if mode != 0 {
                for (i, chunk) in data.chunks(SECTOR).enumerate() {
                    if mode == 2 && rnd() % 2 == 0 {
                        continue;
                    }
                    if i == 0 && mode == 2 {
                        fate = Fate::Torn { first: true };
                    }
                    let s = *off as usize + i * SECTOR;
                    img[s..s + chunk.len()].copy_from_slice(chunk);
                }
            }
            fates.push(Unsynced {
                off: *off,
                len: data.len(),
                fate,
            });
        }
        (img, fates)
    }

    /// Counts one write or sync; cuts the power if its turn has come.
    fn event(st: &mut CrashState) -> io::Result<()> {
        if st.dead {
            return Err(power_cut());
        }
        st.events += 1;
        if let Some(n) = st.events_left {
            if n == 0 {
                st.dead = true;
                return Err(power_cut());
            }
            st.events_left = Some(n - 1);
        }
        Ok(())
    }
}

fn power_cut() -> io::Error {
    io::Error::other("simulated power cut")
}

impl BlockDev for CrashDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = lock(&self.st);
        if st.dead {
            return Err(power_cut());
        }
        let s = range_check(st.durable.len(), off, buf.len())?;
        buf.copy_from_slice(&st.durable[s..s + buf.len()]);
        let (lo, hi) = (off, off + buf.len() as u64);
        for (woff, data) in &st.pending {
            let (wlo, whi) = (*woff, *woff + data.len() as u64);
            if wlo < hi && lo < whi {
                let a = lo.max(wlo);
                let b = hi.min(whi);
                buf[(a - lo) as usize..(b - lo) as usize]
                    .copy_from_slice(&data[(a - wlo) as usize..(b - wlo) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = lock(&self.st);
        Self::event(&mut st)?;
        range_check(st.durable.len(), off, buf.len())?;
        st.pending.push((off, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = lock(&self.st);
        Self::event(&mut st)?;
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            let s = off as usize;
            st.durable[s..s + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.st).durable.len() as u64)
    }
}

/// An in-memory device whose next read (or next read at one offset), once
/// armed, stops until the test lets it go: tests use it to hold an engine
/// operation inside a device read and do something else meanwhile. Syncs
/// can be made to fail.
pub struct GateDev {
    inner: MemDev,
    /// The armed offset; `ANY` for any offset, `OFF` when disarmed.
    at: std::sync::atomic::AtomicU64,
    reached_tx: Mutex<std::sync::mpsc::Sender<()>>,
    reached_rx: Mutex<std::sync::mpsc::Receiver<()>>,
    go_tx: Mutex<std::sync::mpsc::Sender<()>>,
    go_rx: Mutex<std::sync::mpsc::Receiver<()>>,
    fail_sync: std::sync::atomic::AtomicBool,
}

impl GateDev {
    const OFF: u64 = u64::MAX;
    const ANY: u64 = u64::MAX - 1;

    pub fn new(size: usize) -> Self {
        let (reached_tx, reached_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        GateDev {
            inner: MemDev::new(size),
            at: std::sync::atomic::AtomicU64::new(Self::OFF),
            reached_tx: Mutex::new(reached_tx),
            reached_rx: Mutex::new(reached_rx),
            go_tx: Mutex::new(go_tx),
            go_rx: Mutex::new(go_rx),
            fail_sync: std::sync::atomic::AtomicBool::new(false),
        }
    }
    /// Stops the next read.
    pub fn arm(&self) {
        self.at
            .store(Self::ANY, std::sync::atomic::Ordering::SeqCst);
    }
    /// Stops the next read at byte offset `off`.
    pub fn arm_at(&self, off: u64) {
        self.at.store(off, std::sync::atomic::Ordering::SeqCst);
    }
    /// Waits until an armed read has stopped.
    pub fn wait_reached(&self) {
        let _ = lock(&self.reached_rx).recv();
    }
    /// Lets the stopped read go on.
    pub fn release(&self) {
        let _ = lock(&self.go_tx).send(());
    }
    /// Makes syncs fail (true) or work again (false).
    pub fn set_fail_sync(&self, fail: bool) {
        self.fail_sync
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl BlockDev for GateDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let armed = self.at.load(SeqCst);
        if armed != Self::OFF
            && (armed == Self::ANY || armed == off)
            && self
                .at
                .compare_exchange(armed, Self::OFF, SeqCst, SeqCst)
                .is_ok()
        {
            let _ = lock(&self.reached_tx).send(());
            let _ = lock(&self.go_rx).recv();
        }
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        if self.fail_sync.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("injected sync error"));
        }
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}
