//! STARTTLS with real clients: libnbd (nbdinfo, nbdcopy over nbds://) and
//! qemu (tls-creds-x509); plaintext refused when TLS is required.

use std::path::Path;
use std::process::Command;

use cdm_e2e::*;

/// A CA and a server certificate for localhost, in the layout gnutls clients
/// (libnbd, qemu) expect: DIR/ca-cert.pem.
fn make_pki(dir: &Path) {
    require("openssl");
    std::fs::create_dir_all(dir).unwrap();
    sh(&format!(
        r#"cd {d}
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=cdm-test-ca -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server-key.pem -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 -extfile ext.cnf -out server-cert.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=cdm-client -keyout client-key.pem -out client.csr 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > cext.cnf
openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 -extfile cext.cnf -out client-cert.pem 2>/dev/null
"#,
        d = dir.display()
    ));
}

#[test]
fn starttls_with_libnbd_and_qemu_plaintext_refused() {
    require("nbdinfo");
    require("nbdcopy");
    require("qemu-img");
    let env = Env::new("1G");
    env.cdmfs(&["volume", "create", "sec", "--size", "32M"]);
    let pki = env.path("pki");
    make_pki(&pki);
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let srv = env.serve(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let tls_uri = format!(
        "nbds://localhost:{}/sec?tls-certificates={}",
        srv.port,
        pki.display()
    );
    // libnbd over TLS.
    let info = run(Command::new("nbdinfo").arg("--json").arg(&tls_uri));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["protocol"].as_str(), Some("newstyle-fixed"));
    assert_eq!(v["TLS"].as_bool(), Some(true), "{info}");
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(32 << 20));
    // Plaintext is refused.
    let err = run_fail(Command::new("nbdinfo").arg(srv.tcp_uri("sec")));
    assert!(err.contains("TLS") || err.contains("tls"), "{err}");
    // Data both ways through TLS.
    let data = random_bytes(32 << 20, 21);
    write_file(&env.path("in.raw"), &data);
    run(Command::new("nbdcopy")
        .arg(env.path("in.raw"))
        .arg(&tls_uri));
    run(Command::new("nbdcopy")
        .arg(&tls_uri)
        .arg(env.path("out.raw")));
    assert!(std::fs::read(env.path("out.raw")).unwrap() == data);
    // qemu's TLS client.
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.display()
    );
    let opts = format!("driver=nbd,server.type=inet,server.host=localhost,server.port={},export=sec,tls-creds=tls0", srv.port);
    let file = format!("driver=file,filename={}", env.path("in.raw").display());
    run(Command::new("qemu-img").args(["compare", "--object", &obj, "--image-opts", &opts, &file]));
    // A client that does not trust our CA fails the handshake.
    let other = env.path("other-pki");
    make_pki(&other);
    let bad = format!(
        "nbds://localhost:{}/sec?tls-certificates={}",
        srv.port,
        other.display()
    );
    run_fail(Command::new("nbdinfo").arg(&bad));
    // The server kept serving.
    run(Command::new("nbdinfo").arg(&tls_uri));
    srv.stop();
}

#[test]
fn client_certificates_required_with_client_ca() {
    require("nbdinfo");
    let env = Env::new("1G");
    env.cdmfs(&["volume", "create", "sec", "--size", "8M"]);
    let pki = env.path("pki");
    make_pki(&pki);
    let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
    let srv = env.serve(&[
        "--tls-cert",
        &p("server-cert.pem"),
        "--tls-key",
        &p("server-key.pem"),
        "--tls-client-ca",
        &p("ca-cert.pem"),
    ]);
    // The client presents DIR/client-cert.pem signed by the CA: accepted.
    let ok = format!(
        "nbds://localhost:{}/sec?tls-certificates={}",
        srv.port,
        pki.display()
    );
    assert!(run(Command::new("nbdinfo").arg("--size").arg(&ok)).trim() == (8u64 << 20).to_string());
    // Same CA trust but no client certificate: refused.
    let bare = env.path("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    let no_cert = format!(
        "nbds://localhost:{}/sec?tls-certificates={}",
        srv.port,
        bare.display()
    );
    run_fail(Command::new("nbdinfo").arg("--size").arg(&no_cert));
    srv.stop();
}
