//! Structure-aware mutation of protobuf bytes without a schema: the wire format is parsed
//! (a length-delimited field that parses as a message is taken for one), one value is set to
//! an extreme (varints to 0 / u32::MAX / i64::MAX / -1, doubles to NaN / ±inf / 1e308, a
//! string mutated) or a field dropped, repeated or added, and the message is encoded again
//! with correct lengths. Byte mutation alone breaks the nested lengths and stops at the
//! decoder; this reaches the checks behind it (e.g. a `Duration` of i64::MAX seconds).
//! Included next to `rng.rs` (see there).

// why: each including test uses the part it needs.
#![allow(dead_code)]

use super::rng::Rng;

enum Value {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
    Message(Vec<(u32, Value)>),
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn parse(b: &[u8], depth: usize) -> Option<Vec<(u32, Value)>> {
    let mut fields = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let field = u32::try_from(key >> 3).ok().filter(|f| *f > 0)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(b, &mut i)?),
            1 => {
                let v = b.get(i..i + 8)?;
                i += 8;
                Value::Fixed64(u64::from_le_bytes(v.try_into().ok()?))
            }
            2 => {
                let n = usize::try_from(varint(b, &mut i)?).ok()?;
                let v = b.get(i..i.checked_add(n)?)?;
                i += n;
                match parse(v, depth + 1).filter(|m| !m.is_empty() && depth < 16) {
                    Some(m) => Value::Message(m),
                    None => Value::Bytes(v.to_vec()),
                }
            }
            5 => {
                let v = b.get(i..i + 4)?;
                i += 4;
                Value::Fixed32(u32::from_le_bytes(v.try_into().ok()?))
            }
            _ => return None,
        };
        fields.push((field, value));
    }
    Some(fields)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[(u32, Value)], out: &mut Vec<u8>) {
    for (field, value) in fields {
        let wire = match value {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) | Value::Message(_) => 2,
            Value::Fixed32(_) => 5,
        };
        put_varint(out, u64::from(*field) << 3 | wire);
        match value {
            Value::Varint(v) => put_varint(out, *v),
            Value::Fixed64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Fixed32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bytes(b) => {
                put_varint(out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::Message(m) => {
                let mut inner = Vec::new();
                encode(m, &mut inner);
                put_varint(out, inner.len() as u64);
                out.extend_from_slice(&inner);
            }
        }
    }
}

const VARINTS: &[u64] = &[
    0,
    1,
    2,
    100,
    101,
    65_535,
    65_536,
    u32::MAX as u64,
    i32::MAX as u64,
    i64::MAX as u64,
    u64::MAX,
    // -1 as int32/int64, and i64::MIN.
    0xffff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    // Just over the protobuf Duration range (315,576,000,000 s).
    315_576_000_001,
    1_000_000_000,
];

const DOUBLES: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -1.0,
    0.0,
    100.0,
    100.000_1,
    1e308,
    f64::MIN_POSITIVE,
];

/// Number of values (leaves and messages) in `fields`, for picking one uniformly.
fn count(fields: &[(u32, Value)]) -> usize {
    fields
        .iter()
        .map(|(_, v)| match v {
            Value::Message(m) => 1 + count(m),
            _ => 1,
        })
        .sum()
}

/// Mutate the `n`th value (pre-order) of `fields`; `n` counts down as values are passed.
fn mutate_nth(rng: &mut Rng, fields: &mut Vec<(u32, Value)>, n: &mut usize) -> bool {
    for i in 0..fields.len() {
        if *n == 0 {
            match rng.below(8) {
                // Drop the field, or repeat it (a repeated field gets one more element).
                0 => {
                    fields.remove(i);
                }
                1 => {
                    let (f, v) = &fields[i];
                    let mut copy = Vec::new();
                    encode(&[(*f, clone(v))], &mut copy);
                    if let Some(mut extra) = parse(&copy, 0) {
                        fields.append(&mut extra);
                    }
                }
                _ => mutate_value(rng, &mut fields[i].1),
            }
            return true;
        }
        *n -= 1;
        if let Value::Message(m) = &mut fields[i].1
            && mutate_nth(rng, m, n)
        {
            return true;
        }
    }
    false
}

fn clone(v: &Value) -> Value {
    match v {
        Value::Varint(x) => Value::Varint(*x),
        Value::Fixed64(x) => Value::Fixed64(*x),
        Value::Fixed32(x) => Value::Fixed32(*x),
        Value::Bytes(b) => Value::Bytes(b.clone()),
        Value::Message(m) => Value::Message(m.iter().map(|(f, v)| (*f, clone(v))).collect()),
    }
}

fn mutate_value(rng: &mut Rng, v: &mut Value) {
    match v {
        Value::Varint(x) => {
            *x = match rng.below(3) {
                0 => x.wrapping_add(1),
                1 => x.wrapping_sub(1),
                _ => *rng.pick(VARINTS),
            }
        }
        Value::Fixed64(x) => *x = rng.pick(DOUBLES).to_bits(),
        Value::Fixed32(x) => *x = (*rng.pick(DOUBLES) as f32).to_bits(),
        Value::Bytes(b) => *b = rng.mutate(b),
        Value::Message(m) => {
            // A new field: an unknown one, or a known one set twice.
            let field = 1 + rng.below(16) as u32;
            let value = match rng.below(3) {
                0 => Value::Varint(*rng.pick(VARINTS)),
                1 => Value::Fixed64(rng.pick(DOUBLES).to_bits()),
                _ => Value::Bytes(rng.bytes(8)),
            };
            m.push((field, value));
        }
    }
}

/// One to three structural mutations of the message `bytes`; plain byte mutation when it
/// does not parse.
pub fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let Some(mut fields) = parse(bytes, 0) else {
        return rng.mutate(bytes);
    };
    for _ in 0..(1 + rng.below(3)) {
        let total = count(&fields);
        if total == 0 {
            break;
        }
        let mut n = rng.below(total);
        mutate_nth(rng, &mut fields, &mut n);
    }
    let mut out = Vec::new();
    encode(&fields, &mut out);
    out
}
