//! The fleet CA against independent tools: CSRs made by the `openssl` command line, issued
//! certificates verified by rustls-webpki (chain, EKU, validity, URI SAN), CRLs parsed by webpki.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleet_core::ca::{CaSet, CertificateAuthority, IssuancePolicy, RevokedCertificate};
use fleet_core::csr::{CsrError, KeyAlgorithm, MAX_CSR_BYTES, validate_csr};
use fleet_core::identity::{Fingerprint, InstanceIdentity, instance_uri};
use fleet_core::seal::KeyEncryptionKey;
use fleet_core::{InstanceId, TenantId, Timestamp};
use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage, anchor_from_trusted_cert};

const NOW: Timestamp = Timestamp::from_unix_secs(1_790_000_000);

fn ca() -> CertificateAuthority {
    CertificateAuthority::generate("test CA", NOW, Duration::from_secs(10 * 365 * 86_400)).unwrap()
}

/// Runs `openssl` with `args` in `dir`; the tool is part of the build machine's image and CI
/// installs it when missing, so its absence is a failure, not a skip.
fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the openssl command line is required for this test (apt-get install openssl): {e}"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn openssl_csr(newkey: &[&str], extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "req",
        "-new",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "csr.pem",
        "-subj",
        "/CN=agent",
    ];
    args.extend_from_slice(newkey);
    args.extend_from_slice(extra);
    openssl(dir.path(), &args);
    std::fs::read_to_string(dir.path().join("csr.pem")).unwrap()
}

fn verify(
    ca: &CertificateAuthority,
    der: &[u8],
    at: Timestamp,
    usage: KeyUsage,
) -> Result<(), webpki::Error> {
    let ca_der = CertificateDer::from(ca.cert_der().to_vec());
    let anchor = anchor_from_trusted_cert(&ca_der).unwrap();
    let leaf = CertificateDer::from(der.to_vec());
    let ee = EndEntityCert::try_from(&leaf).unwrap();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(at.as_unix_secs() as u64));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        time,
        usage,
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn openssl_csrs_of_every_accepted_key_type_are_signed_and_verify() {
    let ca = ca();
    let policy = IssuancePolicy::default();
    let tenant = TenantId::new("acme").unwrap();
    let cases: [(&[&str], KeyAlgorithm); 4] = [
        (
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
            KeyAlgorithm::EcdsaP256,
        ),
        (&["-newkey", "ed25519"], KeyAlgorithm::Ed25519),
        (&["-newkey", "rsa:2048"], KeyAlgorithm::Rsa { bits: 2048 }),
        (&["-newkey", "rsa:4096"], KeyAlgorithm::Rsa { bits: 4096 }),
    ];
    for (newkey, algorithm) in cases {
        let pem = openssl_csr(newkey, &[]);
        let csr = validate_csr(&pem).unwrap_or_else(|e| panic!("{newkey:?}: {e}"));
        assert_eq!(csr.algorithm(), algorithm);
        let id = InstanceId::random();
        let cert = ca
            .issue_client(&csr, id, Some(&tenant), NOW, &policy)
            .unwrap();

        // Chain, clientAuth EKU and validity, checked by webpki.
        verify(&ca, &cert.der, NOW, KeyUsage::client_auth())
            .unwrap_or_else(|e| panic!("{newkey:?}: {e:?}"));
        assert!(
            verify(&ca, &cert.der, NOW, KeyUsage::server_auth()).is_err(),
            "not a server certificate"
        );
        let just_before = cert.not_before.saturating_sub(Duration::from_secs(1));
        assert!(verify(&ca, &cert.der, just_before, KeyUsage::client_auth()).is_err());
        let expiry = NOW.saturating_add(policy.client_validity);
        assert!(
            verify(
                &ca,
                &cert.der,
                expiry.saturating_sub(Duration::from_secs(1)),
                KeyUsage::client_auth()
            )
            .is_ok()
        );
        assert!(
            verify(
                &ca,
                &cert.der,
                expiry.saturating_add(Duration::from_secs(1)),
                KeyUsage::client_auth()
            )
            .is_err()
        );
        assert_eq!(
            cert.not_before,
            NOW.saturating_sub(Duration::from_secs(300)),
            "backdated 5 minutes"
        );

        // The URI SAN names tenant and instance; nothing from the CSR's subject survives.
        let leaf = CertificateDer::from(cert.der.clone());
        let ee = EndEntityCert::try_from(&leaf).unwrap();
        let uris: Vec<&str> = ee.valid_uri_names().collect();
        assert_eq!(uris, vec![instance_uri(id, Some(&tenant)).as_str()]);
        let identity = InstanceIdentity::from_certificate_der(&cert.der).unwrap();
        assert_eq!(
            (identity.instance, identity.tenant.as_ref()),
            (id, Some(&tenant))
        );
        assert_eq!(identity.serial, cert.record.serial);
        let text = String::from_utf8_lossy(&openssl_text(&cert.pem)).to_string();
        assert!(
            !text.contains("CN=agent") && !text.contains("CN = agent"),
            "subject chosen by the CA:\n{text}"
        );
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
        assert!(text.contains("CA:FALSE"), "{text}");
    }
}

fn openssl_text(cert_pem: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), cert_pem).unwrap();
    openssl(dir.path(), &["x509", "-in", "c.pem", "-noout", "-text"]).stdout
}

#[test]
fn refused_keys_and_requests() {
    let rsa_small = openssl_csr(&["-newkey", "rsa:1024"], &[]);
    assert_eq!(
        validate_csr(&rsa_small).unwrap_err(),
        CsrError::RsaKeySize { bits: 1024 }
    );
    let p384 = openssl_csr(
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1"],
        &[],
    );
    assert!(matches!(
        validate_csr(&p384),
        Err(CsrError::UnsupportedKey(_))
    ));
    let wants_ca = openssl_csr(
        &["-newkey", "ed25519"],
        &["-addext", "basicConstraints=critical,CA:TRUE"],
    );
    assert_eq!(validate_csr(&wants_ca).unwrap_err(), CsrError::RequestsCa);
    let odd_ext = openssl_csr(&["-newkey", "ed25519"], &["-addext", "nsComment=hello"]);
    assert_eq!(
        validate_csr(&odd_ext).unwrap_err(),
        CsrError::UnsupportedExtension
    );
}

#[test]
fn malformed_csrs() {
    let key = rcgen::KeyPair::generate().unwrap();
    let good = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let pem = good.pem().unwrap();
    assert!(validate_csr(&pem).is_ok());

    // One flipped bit in the signature.
    let mut der = good.der().to_vec();
    let last = der.len() - 3;
    der[last] ^= 1;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    assert_eq!(validate_csr(&tampered).unwrap_err(), CsrError::BadSignature);

    assert_eq!(
        validate_csr(&"x".repeat(MAX_CSR_BYTES + 1)).unwrap_err(),
        CsrError::TooLarge {
            size: MAX_CSR_BYTES + 1
        }
    );
    assert_eq!(validate_csr("hello").unwrap_err(), CsrError::NotPem);
    let ca = ca();
    assert_eq!(
        validate_csr(ca.cert_pem()).unwrap_err(),
        CsrError::NotPem,
        "a certificate is not a CSR"
    );
    assert_eq!(
        validate_csr(&pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x01")).unwrap_err(),
        CsrError::Malformed
    );
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.der"), der).unwrap();
    let out = Command::new("openssl")
        .args(["base64", "-in", "in.der"])
        .current_dir(dir.path())
        .output()
        .expect("openssl base64");
    format!(
        "-----BEGIN {label}-----\n{}-----END {label}-----\n",
        String::from_utf8(out.stdout).unwrap()
    )
}

#[test]
fn server_certificate_verifies_for_its_names() {
    let ca = ca();
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "cp.example.com".to_string(),
    ];
    let server = ca
        .issue_server(&names, NOW, Duration::from_secs(365 * 86_400))
        .unwrap();
    verify(&ca, &server.cert_der, NOW, KeyUsage::server_auth()).unwrap();
    let leaf = CertificateDer::from(server.cert_der.clone());
    let ee = EndEntityCert::try_from(&leaf).unwrap();
    for name in ["localhost", "127.0.0.1", "cp.example.com"] {
        let sn = rustls_pki_types::ServerName::try_from(name).unwrap();
        ee.verify_is_valid_for_subject_name(&sn)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    let other = rustls_pki_types::ServerName::try_from("evil.example.com").unwrap();
    assert!(ee.verify_is_valid_for_subject_name(&other).is_err());
    assert!(
        ca.issue_server(&["bad name!".into()], NOW, Duration::from_secs(60))
            .is_err()
    );
}

#[test]
fn ca_round_trips_through_pem_and_pins_by_fingerprint() {
    let set = CaSet::single(ca());
    let ca = std::sync::Arc::clone(set.active());
    let kek = KeyEncryptionKey::generate().unwrap();
    let material = set.seal(&kek).unwrap();
    assert!(!material.is_clear());
    assert!(
        !material.key_pem.contains("PRIVATE KEY"),
        "the stored key is sealed: {}",
        material.key_pem
    );
    let loaded = CaSet::open(&material, Some(&kek)).unwrap();
    assert_eq!(loaded.active().fingerprint(), ca.fingerprint());
    // Another key-encryption key, or none, does not open it; an altered certificate neither.
    let other_kek = KeyEncryptionKey::generate().unwrap();
    let err = CaSet::open(&material, Some(&other_kek)).unwrap_err();
    match err {
        fleet_core::ca::CaError::Sealed(fleet_core::seal::SealError::WrongKey {
            sealed_with,
            have,
        }) => assert_eq!((sealed_with, have), (kek.id(), other_kek.id())),
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert!(CaSet::open(&material, None).is_err());
    let swapped = fleet_core::ca::CaMaterial {
        cert_pem: CertificateAuthority::generate("other", NOW, Duration::from_secs(86_400))
            .unwrap()
            .cert_pem()
            .to_owned(),
        key_pem: material.key_pem.clone(),
    };
    assert!(CaSet::open(&swapped, Some(&kek)).is_err());
    // A clear key (a store from before sealing) opens without one, and says it is clear.
    let (cert_pem, key_pem) = ca.export_pem();
    let clear = fleet_core::ca::CaMaterial { cert_pem, key_pem };
    assert!(clear.is_clear());
    assert_eq!(
        CaSet::open(&clear, None).unwrap().active().fingerprint(),
        ca.fingerprint()
    );
    assert!(
        !format!("{clear:?}").contains("PRIVATE KEY"),
        "Debug redacts the key"
    );
    // What `openssl x509 -outform DER | sha256sum` prints.
    assert_eq!(ca.fingerprint(), Fingerprint::of(ca.cert_der()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let out = openssl(
        dir.path(),
        &["x509", "-in", "ca.pem", "-noout", "-fingerprint", "-sha256"],
    )
    .stdout;
    let printed = String::from_utf8(out).unwrap();
    let hex: String = printed
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(hex, ca.fingerprint().to_string());

    // A key that does not belong to the certificate is refused.
    let other = CertificateAuthority::generate("other", NOW, Duration::from_secs(86_400)).unwrap();
    let err = CertificateAuthority::from_pem(ca.cert_pem(), &other.export_pem().1).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    // A certificate of another CA does not pass as ours.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = validate_csr(
        &rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap(),
    )
    .unwrap();
    let foreign = other
        .issue_client(
            &csr,
            InstanceId::random(),
            None,
            NOW,
            &IssuancePolicy::default(),
        )
        .unwrap();
    assert!(ca.verify_issued_ignoring_time(&foreign.der).is_none());
    assert!(verify(&ca, &foreign.der, NOW, KeyUsage::client_auth()).is_err());
}

#[test]
fn crl_lists_revoked_serials() {
    let ca = ca();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = validate_csr(
        &rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap(),
    )
    .unwrap();
    let id = InstanceId::random();
    let cert = ca
        .issue_client(&csr, id, None, NOW, &IssuancePolicy::default())
        .unwrap();
    let revoked = [RevokedCertificate {
        serial: cert.record.serial,
        not_after: cert.record.not_after,
        revoked_at: NOW,
        instance: id,
    }];
    let pem = ca
        .crl(
            &revoked,
            7,
            NOW,
            NOW.saturating_add(Duration::from_secs(3600)),
        )
        .unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let crl = webpki::OwnedCertRevocationList::from_der(&block.contents).unwrap();
    // The certificate is refused by webpki when the CRL is consulted.
    let crl = webpki::CertRevocationList::from(crl);
    let crls = [&crl];
    let options = webpki::RevocationOptionsBuilder::new(&crls)
        .unwrap()
        .build();
    let ca_der = CertificateDer::from(ca.cert_der().to_vec());
    let anchor = anchor_from_trusted_cert(&ca_der).unwrap();
    let leaf = CertificateDer::from(cert.der.clone());
    let ee = EndEntityCert::try_from(&leaf).unwrap();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(NOW.as_unix_secs() as u64));
    let res = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            time,
            KeyUsage::client_auth(),
            Some(options),
            None,
        )
        .map(|_| ());
    assert!(
        matches!(res, Err(webpki::Error::CertRevoked)),
        "{:?}",
        res.err()
    );
    // An unrevoked certificate passes the same check.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = validate_csr(
        &rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap(),
    )
    .unwrap();
    let fine = ca
        .issue_client(
            &csr,
            InstanceId::random(),
            None,
            NOW,
            &IssuancePolicy::default(),
        )
        .unwrap();
    let leaf = CertificateDer::from(fine.der.clone());
    let ee = EndEntityCert::try_from(&leaf).unwrap();
    let options = webpki::RevocationOptionsBuilder::new(&crls)
        .unwrap()
        .build();
    let anchor = anchor_from_trusted_cert(&ca_der).unwrap();
    let res = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            time,
            KeyUsage::client_auth(),
            Some(options),
            None,
        )
        .map(|_| ());
    assert!(res.is_ok(), "{:?}", res.err());
}
