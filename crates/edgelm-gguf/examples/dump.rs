fn main() {
    let path = std::env::args().nth(1).expect("usage: dump FILE");
    let f = edgelm_gguf::GgufFile::open(&path).expect("parse");
    for (k, v) in f.metadata() {
        println!("{k} = {}", v.display_short());
    }
    for t in f.tensors().iter().take(40) {
        println!("{} {:?} {}", t.name, t.dims, t.ty);
    }
}
