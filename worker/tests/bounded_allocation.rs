//! No reader allocates a size taken from the file before checking it
//! against the file's length: files whose headers claim huge sizes are
//! refused while the largest single allocation stays small. Measured with
//! a counting global allocator, so this binary holds this one test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use ringleader_spec::job::DatasetFormat;
use ringleader_worker::train::dataset::decode;

/// The system allocator, remembering the largest request.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn npy(version: u8, header_length: Option<u32>, header: &str) -> Vec<u8> {
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.extend([version, 0]);
    let length = header_length.unwrap_or(header.len() as u32);
    if version == 1 {
        bytes.extend((length as u16).to_le_bytes());
    } else {
        bytes.extend(length.to_le_bytes());
    }
    bytes.extend(header.as_bytes());
    bytes.extend([0; 64]);
    bytes
}

fn safetensors(header_length: u64, header: &str) -> Vec<u8> {
    let mut bytes = header_length.to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0; 64]);
    bytes
}

#[test]
fn huge_claimed_sizes_are_refused_without_allocating_them() {
    let idx = |dims: &[u32]| {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend([1; 64]);
        bytes
    };
    let cases: Vec<(DatasetFormat, Vec<u8>)> = vec![
        // 2^40 items, and dimensions that overflow 64 bits, and an empty
        // array whose other dimensions claim 2^64 per example.
        (DatasetFormat::Idx, idx(&[1 << 20, 1 << 20])),
        (DatasetFormat::Idx, idx(&[u32::MAX, u32::MAX, u32::MAX])),
        (DatasetFormat::Idx, idx(&[0, u32::MAX, u32::MAX])),
        (DatasetFormat::Idx, gzip(&idx(&[1 << 20, 1 << 20]))),
        // A header length of 4 GiB; shapes of 2^40 and beyond 2^64.
        (DatasetFormat::Npy, npy(2, Some(u32::MAX), "{")),
        (DatasetFormat::Npy, npy(3, Some(u32::MAX - 4), "{")),
        (
            DatasetFormat::Npy,
            npy(1, None, "{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }"),
        ),
        (
            DatasetFormat::Npy,
            npy(
                1,
                None,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
            ),
        ),
        (
            DatasetFormat::Npy,
            npy(1, None, "{'descr': '<u1', 'fortran_order': False, 'shape': (0, 18446744073709551615), }"),
        ),
        // A header length of 2^60, of 99 MB, and a tensor of 2^40 floats.
        (DatasetFormat::Safetensors, safetensors(1 << 60, "{}")),
        (DatasetFormat::Safetensors, safetensors(99_000_000, "{}")),
        (
            DatasetFormat::Safetensors,
            safetensors(
                118,
                r#"{"features":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]},"labels":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            ),
        ),
    ];
    for (format, bytes) in cases {
        LARGEST.store(0, Ordering::Relaxed);
        let error = decode(format, &bytes).expect_err("a huge claim is refused");
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest < 1 << 20,
            "{format:?}: {error}: allocated {largest} bytes at once for a {}-byte file",
            bytes.len()
        );
    }
    // The counter counts: a real file's reading allocates.
    LARGEST.store(0, Ordering::Relaxed);
    let csv = "1,2,0\n".repeat(1000);
    assert_eq!(decode(DatasetFormat::Csv, csv.as_bytes()).unwrap(), 1000);
    assert!(LARGEST.load(Ordering::Relaxed) >= 4 * 2000);
}
