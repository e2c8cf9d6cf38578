//! Helpers shared by the worker's integration tests.

/// A `.npy` file (version 1) with `header` as its dict, then `data`;
/// numpy pads the header with spaces to a multiple of 64 bytes, then '\n'.
pub fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.to_string();
    header.push_str(&" ".repeat(63 - (10 + header.len()) % 64));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}
