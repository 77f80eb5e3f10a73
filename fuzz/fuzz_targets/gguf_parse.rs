//! Arbitrary bytes into the GGUF parser: it must return Ok or Err, never panic, and on Ok every
//! metadata value and every tensor view must be usable.
#![no_main]

use edgelm_gguf::{GgufFile, GgufWriter, Value};
use libfuzzer_sys::fuzz_target;

fn walk(v: &Value, depth: usize) {
    assert!(depth < 4, "arrays nested deeper than the parser allows");
    let _ = (
        v.value_type(),
        v.as_u64(),
        v.as_i64(),
        v.as_f64(),
        v.as_bool(),
    );
    let _ = v.as_str().map(str::len);
    let _ = v.display_short();
    if let Value::Array(a) = v {
        for i in 0..a.len() {
            let item = a.get(i).expect("every index below len() is an element");
            assert_eq!(item.value_type(), a.elem_type(), "array element of the wrong type");
            walk(&item, depth + 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let len = file.bytes().len() as u64;
    assert!(file.alignment.is_power_of_two());
    assert!(file.data_offset % file.alignment == 0);
    for (key, value) in file.metadata() {
        walk(value, 0);
        // Same entry (not `==`: NaN floats are not equal to themselves).
        assert!(file.get(key).is_some_and(|v| std::ptr::eq(v, value)));
        let _ = (file.get_str(key), file.get_u64(key), file.get_f64(key));
        let _ = (file.require_str(key), file.require_u64(key));
    }
    for info in file.tensors() {
        let view = file.tensor(&info.name).expect("listed tensor has a view");
        assert_eq!(view.data.len() as u64, info.n_bytes);
        assert_eq!(view.ty().bytes_for(info.n_elements), Some(info.n_bytes));
        assert!(file.data_offset + info.offset + info.n_bytes <= len);
        let range = file.tensor_range(&info.name).unwrap();
        assert_eq!(range.len() as u64, info.n_bytes);
        // Touch the bytes at both ends.
        if let (Some(first), Some(last)) = (view.data.first(), view.data.last()) {
            std::hint::black_box((*first, *last));
        }
        // Dequantize the first row: the parser's size checks must agree with the quant crate's.
        let row = view.dims()[0] as usize;
        if row > 0 && row <= 1 << 16 && edgelm_quant::can_dequantize(view.ty()) {
            let bytes = edgelm_quant::row_bytes(view.ty(), row).expect("row checked at parse");
            if bytes <= view.data.len() {
                let mut out = vec![0f32; row];
                edgelm_quant::dequantize_row(view.ty(), &view.data[..bytes], &mut out)
                    .expect("whole row of a parsed tensor dequantizes");
            }
        }
    }

    // Written back with GgufWriter, the file must parse to the same metadata and tensors.
    // (Compared through Debug so NaN payload-insensitive floats and -0.0 compare sensibly.)
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        w.set(key, value.clone());
    }
    for info in file.tensors() {
        let data = file.tensor(&info.name).unwrap().data.to_vec();
        w.add_tensor(&info.name, &info.dims, info.ty, data)
            .expect("a parsed tensor is accepted by the writer");
    }
    let again = GgufFile::from_bytes(w.to_bytes()).expect("rewritten file parses");
    assert_eq!(
        format!("{:?}", again.metadata()),
        format!("{:?}", file.metadata())
    );
    assert_eq!(again.alignment, file.alignment);
    assert_eq!(again.tensors().len(), file.tensors().len());
    for (a, b) in again.tensors().iter().zip(file.tensors()) {
        assert_eq!(
            (&a.name, &a.dims, a.ty, a.n_bytes),
            (&b.name, &b.dims, b.ty, b.n_bytes)
        );
        assert!(again.tensor(&a.name).unwrap().data == file.tensor(&b.name).unwrap().data);
    }
});
