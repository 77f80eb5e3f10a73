//! Typed metadata values.

/// GGUF metadata value type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Encoded size of a scalar of this type (None for strings and arrays).
    pub fn scalar_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

/// A metadata array, stored compactly: scalars as their little-endian bytes, strings in one
/// buffer (a 262k-token vocabulary held as one `Value` per entry took ~30 MB; packed, ~4 MB).
/// It keeps its element type so empty arrays round-trip.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    elem: ValueType,
    items: Items,
}

#[derive(Debug, Clone, PartialEq)]
enum Items {
    Scalars(Vec<u8>),
    Strings { text: String, ends: Vec<usize> },
    Arrays(Vec<Array>),
}

impl Array {
    /// An empty array of `elem` values.
    pub fn new(elem: ValueType) -> Array {
        let items = match elem {
            ValueType::String => Items::Strings {
                text: String::new(),
                ends: Vec::new(),
            },
            ValueType::Array => Items::Arrays(Vec::new()),
            _ => Items::Scalars(Vec::new()),
        };
        Array { elem, items }
    }

    /// Append `v`; a value of another type than the element type is handed back.
    pub fn push(&mut self, v: Value) -> Result<(), Value> {
        if v.value_type() != self.elem {
            return Err(v);
        }
        match (&mut self.items, v) {
            (Items::Strings { text, ends }, Value::String(s)) => {
                text.push_str(&s);
                ends.push(text.len());
            }
            (Items::Arrays(a), Value::Array(x)) => a.push(x),
            (Items::Scalars(b), v) => v.put_scalar(b),
            (_, v) => return Err(v),
        }
        Ok(())
    }

    /// Append a string element without building a `Value` (the parser's path).
    pub(crate) fn push_str(&mut self, s: &str) {
        if let Items::Strings { text, ends } = &mut self.items {
            text.push_str(s);
            ends.push(text.len());
        }
    }

    /// Append already-encoded little-endian scalars (the parser's path).
    pub(crate) fn extend_scalars(&mut self, bytes: &[u8]) {
        if let Items::Scalars(b) = &mut self.items {
            b.extend_from_slice(bytes);
        }
    }

    pub(crate) fn push_array(&mut self, a: Array) {
        if let Items::Arrays(v) = &mut self.items {
            v.push(a);
        }
    }

    pub fn elem_type(&self) -> ValueType {
        self.elem
    }

    pub fn len(&self) -> usize {
        match &self.items {
            Items::Scalars(b) => b.len() / self.elem.scalar_size().unwrap_or(1),
            Items::Strings { ends, .. } => ends.len(),
            Items::Arrays(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a value (strings and nested arrays are copied).
    pub fn get(&self, i: usize) -> Option<Value> {
        match &self.items {
            Items::Scalars(b) => {
                let size = self.elem.scalar_size()?;
                Value::from_scalar(self.elem, b.get(i * size..(i + 1) * size)?)
            }
            Items::Strings { .. } => self.str_at(i).map(|s| Value::String(s.to_owned())),
            Items::Arrays(a) => a.get(i).cloned().map(Value::Array),
        }
    }

    /// Element `i` of a string array.
    pub fn str_at(&self, i: usize) -> Option<&str> {
        match &self.items {
            Items::Strings { text, ends } => {
                let start = if i == 0 { 0 } else { *ends.get(i - 1)? };
                text.get(start..*ends.get(i)?)
            }
            _ => None,
        }
    }

    /// Element `i` of a nested array.
    pub fn array_at(&self, i: usize) -> Option<&Array> {
        match &self.items {
            Items::Arrays(a) => a.get(i),
            _ => None,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An array of `elem` values; None if one of them has another type.
    pub fn array(elem: ValueType, values: Vec<Value>) -> Option<Value> {
        let mut a = Array::new(elem);
        for v in values {
            a.push(v).ok()?;
        }
        Some(Value::Array(a))
    }

    /// A scalar of type `ty` from its little-endian bytes (exactly its size).
    pub(crate) fn from_scalar(ty: ValueType, b: &[u8]) -> Option<Value> {
        Some(match ty {
            ValueType::U8 => Value::U8(b[0]),
            ValueType::I8 => Value::I8(b[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(b.try_into().ok()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(b.try_into().ok()?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(b.try_into().ok()?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(b.try_into().ok()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(b.try_into().ok()?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(b.try_into().ok()?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(b.try_into().ok()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(b.try_into().ok()?)),
            ValueType::Bool => Value::Bool(b[0] != 0),
            ValueType::String | ValueType::Array => return None,
        })
    }

    /// Append a scalar's little-endian bytes (strings and arrays append nothing).
    pub(crate) fn put_scalar(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::String(_) | Value::Array(_) => {}
        }
    }

    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type as u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    /// Any integer type as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => self.as_u64().map(|v| v != 0),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays abbreviated), for `inspect`.
    pub fn display_short(&self) -> String {
        match self {
            Value::String(s) => {
                let mut t: String = s.chars().take(80).collect();
                if s.chars().count() > 80 {
                    t.push('…');
                }
                format!("{t:?}")
            }
            Value::Array(a) => {
                let head: Vec<String> = (0..a.len().min(4))
                    .filter_map(|i| a.get(i))
                    .map(|x| x.display_short())
                    .collect();
                let more = if a.len() > 4 { ", …" } else { "" };
                let ty = a.elem_type();
                format!("[{ty:?}; {}] [{}{more}]", a.len(), head.join(", "))
            }
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
        }
    }
}
