//! Kiln's own tensor type: what flows between the API, the batcher and models.

use std::fmt;

/// Element types of the V2 protocol that Kiln models can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Fp32,
    Fp64,
    Int32,
    Int64,
    Bytes,
}

impl DataType {
    /// Parses the V2 protocol's data type string (`FP32`, `BYTES`, ...).
    pub fn from_v2(name: &str) -> Option<Self> {
        Some(match name {
            "FP32" => Self::Fp32,
            "FP64" => Self::Fp64,
            "INT32" => Self::Int32,
            "INT64" => Self::Int64,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }

    /// The V2 protocol's name of this type.
    pub fn as_v2(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Bytes => "BYTES",
        }
    }

    /// Size of one element in raw form; `None` for variable-size BYTES.
    pub fn element_bytes(self) -> Option<usize> {
        match self {
            Self::Fp32 | Self::Int32 => Some(4),
            Self::Fp64 | Self::Int64 => Some(8),
            Self::Bytes => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_v2())
    }
}

/// Element storage, one variant per supported data type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::Fp32(v) => v.len(),
            Self::Fp64(v) => v.len(),
            Self::Int32(v) => v.len(),
            Self::Int64(v) => v.len(),
            Self::Bytes(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data type of these elements.
    pub fn datatype(&self) -> DataType {
        match self {
            Self::Fp32(_) => DataType::Fp32,
            Self::Fp64(_) => DataType::Fp64,
            Self::Int32(_) => DataType::Int32,
            Self::Int64(_) => DataType::Int64,
            Self::Bytes(_) => DataType::Bytes,
        }
    }

    /// An empty buffer of the same kind with room for `capacity` elements.
    pub fn empty_like(&self, capacity: usize) -> Self {
        match self {
            Self::Fp32(_) => Self::Fp32(Vec::with_capacity(capacity)),
            Self::Fp64(_) => Self::Fp64(Vec::with_capacity(capacity)),
            Self::Int32(_) => Self::Int32(Vec::with_capacity(capacity)),
            Self::Int64(_) => Self::Int64(Vec::with_capacity(capacity)),
            Self::Bytes(_) => Self::Bytes(Vec::with_capacity(capacity)),
        }
    }

    /// Appends `other`'s elements; false when the types differ.
    pub fn extend_from(&mut self, other: &TensorData) -> bool {
        match (self, other) {
            (Self::Fp32(a), Self::Fp32(b)) => a.extend_from_slice(b),
            (Self::Fp64(a), Self::Fp64(b)) => a.extend_from_slice(b),
            (Self::Int32(a), Self::Int32(b)) => a.extend_from_slice(b),
            (Self::Int64(a), Self::Int64(b)) => a.extend_from_slice(b),
            (Self::Bytes(a), Self::Bytes(b)) => a.extend(b.iter().cloned()),
            _ => return false,
        }
        true
    }

    /// The elements in `range`, as a new buffer.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        match self {
            Self::Fp32(v) => Self::Fp32(v[range].to_vec()),
            Self::Fp64(v) => Self::Fp64(v[range].to_vec()),
            Self::Int32(v) => Self::Int32(v[range].to_vec()),
            Self::Int64(v) => Self::Int64(v[range].to_vec()),
            Self::Bytes(v) => Self::Bytes(v[range].to_vec()),
        }
    }

    /// Little-endian row-major bytes, as the V2 raw contents carry them
    /// (BYTES elements as a 4-byte length followed by the bytes).
    pub fn to_raw(&self) -> Vec<u8> {
        fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|x| f(*x)).collect()
        }
        match self {
            Self::Fp32(v) => le(v, f32::to_le_bytes),
            Self::Fp64(v) => le(v, f64::to_le_bytes),
            Self::Int32(v) => le(v, i32::to_le_bytes),
            Self::Int64(v) => le(v, i64::to_le_bytes),
            Self::Bytes(v) => {
                let mut out = Vec::with_capacity(v.iter().map(|b| b.len() + 4).sum());
                for item in v {
                    // A single element over 4 GiB cannot pass the message limit.
                    out.extend_from_slice(&(item.len() as u32).to_le_bytes());
                    out.extend_from_slice(item);
                }
                out
            }
        }
    }
}

/// A dense tensor: a shape (first dimension = rows of the batch) and its
/// elements in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// Rows along the batch dimension.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Stacks tensors along the batch dimension. All parts must share the
    /// element type and the per-row shape (validation guarantees this).
    pub fn concat_rows(parts: &[&Tensor]) -> Option<Tensor> {
        let first = parts.first()?;
        let rows = parts.iter().map(|t| t.rows()).sum();
        let mut data = first.data.empty_like(rows * first.row_len());
        for part in parts {
            if part.shape[1..] != first.shape[1..] || !data.extend_from(&part.data) {
                return None;
            }
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Some(Tensor { shape, data })
    }

    /// The rows `start..start + count` as a new tensor.
    pub fn slice_rows(&self, start: usize, count: usize) -> Tensor {
        let row_len = self.row_len();
        let mut shape = self.shape.clone();
        shape[0] = count;
        Tensor { shape, data: self.data.slice(start * row_len..(start + count) * row_len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_then_slice_round_trips_rows() {
        let a = Tensor { shape: vec![1, 2], data: TensorData::Fp32(vec![1.0, 2.0]) };
        let b = Tensor { shape: vec![2, 2], data: TensorData::Fp32(vec![3.0, 4.0, 5.0, 6.0]) };
        let both = Tensor::concat_rows(&[&a, &b]).expect("same row shape");
        assert_eq!(both.shape, vec![3, 2]);
        assert_eq!(both.slice_rows(0, 1), a);
        assert_eq!(both.slice_rows(1, 2), b);
    }

    #[test]
    fn concat_refuses_mismatched_rows() {
        let a = Tensor { shape: vec![1, 2], data: TensorData::Fp32(vec![1.0, 2.0]) };
        let b = Tensor { shape: vec![1, 3], data: TensorData::Fp32(vec![3.0, 4.0, 5.0]) };
        assert!(Tensor::concat_rows(&[&a, &b]).is_none());
    }

    #[test]
    fn bytes_raw_form_is_length_prefixed() {
        let t = TensorData::Bytes(vec![b"ab".to_vec()]);
        assert_eq!(t.to_raw(), vec![2, 0, 0, 0, b'a', b'b']);
    }
}
