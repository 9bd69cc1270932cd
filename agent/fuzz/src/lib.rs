//! Shared pieces of sonde's fuzz targets: the byte format `conn_stream` reads as a script of
//! connection events, and its encoder (used by `examples/gen_corpus.rs` to write seeds).
//!
//! The format is deliberately simple so that mutations stay meaningful: a 3-byte config
//! prefix, then operations, each one opcode byte followed by its operands. Whatever the bytes,
//! they decode to *some* script (missing bytes read as 0, lengths are clamped), so every input
//! exercises the table.
//!
//! ```text
//! config:  [max_conns-1 (mod 4)] [max_head_bytes index] [max_pipelined index]
//! op 0:    OPEN  [slot:2 | role:2 | new_generation:1]
//! op 1-3:  DATA  [slot:2 | egress:1 | gap:1 | truncated:1 | rewind:1 | stale:1 | ts_back:1]
//!                [captured length] [gap amount]? [uncaptured amount]? [rewind amount]? bytes..
//! op 4:    CLOSE [slot]
//! op 5:    EXIT  [process]
//! op 6:    EXPIRE (the clock jumps past the idle timeout)
//! op 7:    TICK  [ms]
//! ```
//! Opcodes are taken modulo 8. Amounts are exponential: `a` means `1 << (a % 64)` plus `a`,
//! so both small skips and 2^63-sized ones are reachable in one byte.

/// Connection slots a script can use; slots 0-1 belong to one process, 2-3 to another.
pub const SLOTS: usize = 4;

pub const HEAD_LIMITS: [usize; 4] = [16, 64, 256, 4096];
pub const PIPELINE_LIMITS: [usize; 4] = [1, 2, 4, 64];
pub const IDLE_TIMEOUT_NS: u64 = 5_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub max_conns: usize,
    pub max_head_bytes: usize,
    pub max_pipelined: usize,
}

/// Role byte of an OPEN: 0 server, 1 client, 2-3 unknown (joined mid-stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleOp {
    Server,
    Client,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOp<'a> {
    pub slot: usize,
    pub egress: bool,
    /// Bytes lost before this event (its `pos` jumps ahead).
    pub gap: u64,
    /// Bytes of this syscall that were not captured (after `bytes`).
    pub uncaptured: u64,
    /// The event starts this many bytes before the expected position (overlap).
    pub rewind: u64,
    /// The event carries the previous generation of the slot's connection id.
    pub stale: bool,
    /// Its timestamp is earlier than the previous event's (per-CPU clocks, reordering).
    pub ts_back: bool,
    pub bytes: &'a [u8],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Open {
        slot: usize,
        role: RoleOp,
        new_generation: bool,
    },
    Data(DataOp<'a>),
    Close {
        slot: usize,
    },
    Exit {
        process: usize,
    },
    Expire,
    Tick {
        ms: u8,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        match self.buf.split_first() {
            Some((&b, rest)) => {
                self.buf = rest;
                b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.buf.split_at(n.min(self.buf.len()));
        self.buf = b;
        a
    }
}

pub fn amount(a: u8) -> u64 {
    (1u64 << (a % 64)).saturating_add(u64::from(a))
}

/// Smallest amount byte whose [`amount`] is at least `n` (for the encoder).
fn amount_byte(n: u64) -> u8 {
    (0..=255u8).find(|&a| amount(a) >= n).unwrap_or(63)
}

/// Decodes a script; never fails.
pub fn decode(input: &[u8]) -> (Config, Vec<Op<'_>>) {
    let mut r = Reader { buf: input };
    let cfg = Config {
        max_conns: usize::from(r.byte() % 4) + 1,
        max_head_bytes: HEAD_LIMITS[usize::from(r.byte() % 4)],
        max_pipelined: PIPELINE_LIMITS[usize::from(r.byte() % 4)],
    };
    let mut ops = Vec::new();
    while !r.buf.is_empty() {
        let op = match r.byte() % 8 {
            0 => {
                let b = r.byte();
                Op::Open {
                    slot: usize::from(b & 3),
                    role: match (b >> 2) & 3 {
                        0 => RoleOp::Server,
                        1 => RoleOp::Client,
                        _ => RoleOp::Unknown,
                    },
                    new_generation: b & 0x10 != 0,
                }
            }
            1..=3 => {
                let f = r.byte();
                let cap = usize::from(r.byte());
                let gap = if f & 0x08 != 0 { amount(r.byte()) } else { 0 };
                let uncaptured = if f & 0x10 != 0 { amount(r.byte()) } else { 0 };
                let rewind = if f & 0x20 != 0 { amount(r.byte()) } else { 0 };
                Op::Data(DataOp {
                    slot: usize::from(f & 3),
                    egress: f & 0x04 != 0,
                    gap,
                    uncaptured,
                    rewind,
                    stale: f & 0x40 != 0,
                    ts_back: f & 0x80 != 0,
                    bytes: r.take(cap),
                })
            }
            4 => Op::Close {
                slot: usize::from(r.byte() & 3),
            },
            5 => Op::Exit {
                process: usize::from(r.byte() & 1),
            },
            6 => Op::Expire,
            _ => Op::Tick { ms: r.byte() },
        };
        ops.push(op);
    }
    (cfg, ops)
}

/// Builds scripts (for seeds). Data longer than 255 bytes is split into several events.
pub struct Script {
    out: Vec<u8>,
}

impl Script {
    /// `max_conns` 1..=4; limits are indexes into [`HEAD_LIMITS`] and [`PIPELINE_LIMITS`].
    pub fn new(max_conns: u8, head_limit: u8, pipeline_limit: u8) -> Self {
        Script {
            out: vec![max_conns.saturating_sub(1), head_limit, pipeline_limit],
        }
    }

    pub fn open(mut self, slot: u8, role: RoleOp, new_generation: bool) -> Self {
        let role = match role {
            RoleOp::Server => 0,
            RoleOp::Client => 1,
            RoleOp::Unknown => 2,
        };
        self.out
            .extend([0, (slot & 3) | role << 2 | u8::from(new_generation) << 4]);
        self
    }

    /// Plain, fully captured data, cut into events of at most `chunk` bytes.
    pub fn data(self, slot: u8, egress: bool, bytes: &[u8], chunk: usize) -> Self {
        self.data_with(slot, egress, bytes, chunk, 0, 0)
    }

    /// Data preceded by a gap of at least `gap` bytes, the last event followed by at least
    /// `uncaptured` bytes that were not captured.
    pub fn data_with(
        mut self,
        slot: u8,
        egress: bool,
        bytes: &[u8],
        chunk: usize,
        gap: u64,
        uncaptured: u64,
    ) -> Self {
        let chunk = chunk.clamp(1, 255);
        let pieces: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[][..]]
        } else {
            bytes.chunks(chunk).collect()
        };
        let last = pieces.len() - 1;
        for (i, p) in pieces.into_iter().enumerate() {
            let mut f = (slot & 3) | u8::from(egress) << 2;
            let mut extra = Vec::new();
            if i == 0 && gap > 0 {
                f |= 0x08;
                extra.push(amount_byte(gap));
            }
            if i == last && uncaptured > 0 {
                f |= 0x10;
                extra.push(amount_byte(uncaptured));
            }
            self.out.extend([1, f, p.len() as u8]);
            self.out.extend(extra);
            self.out.extend_from_slice(p);
        }
        self
    }

    pub fn close(mut self, slot: u8) -> Self {
        self.out.extend([4, slot & 3]);
        self
    }

    pub fn exit(mut self, process: u8) -> Self {
        self.out.extend([5, process & 1]);
        self
    }

    pub fn expire(mut self) -> Self {
        self.out.push(6);
        self
    }

    pub fn tick(mut self, ms: u8) -> Self {
        self.out.extend([7, ms]);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_and_decoder_agree() {
        let s = Script::new(2, 1, 3)
            .open(1, RoleOp::Client, true)
            .data_with(1, true, b"GET / HTTP/1.1\r\n\r\n", 5, 100, 7)
            .close(1)
            .exit(1)
            .expire()
            .tick(9)
            .finish();
        let (cfg, ops) = decode(&s);
        assert_eq!(
            cfg,
            Config {
                max_conns: 2,
                max_head_bytes: 64,
                max_pipelined: 64
            }
        );
        assert_eq!(ops.len(), 1 + 4 + 4);
        match &ops[1] {
            Op::Data(d) => {
                assert!(d.egress && d.gap >= 100 && d.uncaptured == 0);
                assert_eq!(d.bytes, b"GET /");
            }
            o => panic!("{o:?}"),
        }
        match &ops[4] {
            Op::Data(d) => assert!(d.uncaptured >= 7 && d.bytes == b"\n\r\n"),
            o => panic!("{o:?}"),
        }
    }
}
