fn main() {
    println!("{}", wirescope::EBPF_OBJECT.len());
}
