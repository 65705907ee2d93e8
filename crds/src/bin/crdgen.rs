fn main() {
    use kube::CustomResourceExt;
    print!("{}", serde_yaml::to_string(&zerodrop_crds::StreamPipeline::crd()).unwrap());
}
