//! X.509 certificates as the service API receives them (service-api.md §4.4): decoding the
//! accepted input forms to DER, and computing the `info` object DPS returns in their place.
//!
//! * [`decode_certificate`] — PEM text, base64 of PEM text, or bare base64 DER → DER.
//! * [`certificate_info`] — DER → [`X509CertificateInfo`] (names in .NET
//!   `X500DistinguishedName.Name` style, upper-case hex thumbprints and serial, `Z` dates).
//! * [`Certificate`] — an owned, already-parsed certificate with the few facts device
//!   attestation needs (CN, thumbprints, CA flag, validity).

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use muster_proto::attestation::X509CertificateInfo;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::asn1_rs::{Tag, ToDer};
use x509_parser::time::ASN1Time;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// What the service accepts, for error messages.
const EXPECTED_FORMS: &str = "a PEM certificate (-----BEGIN CERTIFICATE-----), base64 of such PEM text, or base64 of a DER certificate";

/// Standard alphabet, lenient about padding and trailing bits (inputs come from many tools).
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why certificate input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate is empty; expected {EXPECTED_FORMS}")]
    Empty,
    #[error("the certificate is not recognised; expected {EXPECTED_FORMS}")]
    Unrecognised,
    #[error("the PEM text contains no CERTIFICATE block; expected {EXPECTED_FORMS}")]
    NoCertificateBlock,
    #[error("malformed PEM CERTIFICATE block: {0}")]
    MalformedPem(&'static str),
    #[error("the certificate is not a valid DER-encoded X.509 certificate: {0}")]
    InvalidDer(String),
    #[error("the certificate's validity time is out of range")]
    InvalidTime,
}

/// Returns the DER of the first certificate in `input`, which may be PEM text (several blocks
/// allowed: the first `CERTIFICATE` block is taken), base64 of PEM text, or base64 of DER (line
/// breaks and other whitespace allowed anywhere). The DER is checked to parse as X.509.
pub fn decode_certificate(input: &str) -> Result<Vec<u8>, CertificateError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(CertificateError::Empty);
    }
    let der = if trimmed.contains("-----BEGIN") {
        first_pem_certificate(trimmed)?
    } else {
        let compact: String = trimmed
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let decoded = LENIENT_B64
            .decode(compact.as_bytes())
            .map_err(|_| CertificateError::Unrecognised)?;
        if decoded.first() == Some(&0x30) {
            decoded
        } else {
            match std::str::from_utf8(&decoded) {
                Ok(text) if text.contains("-----BEGIN") => first_pem_certificate(text)?,
                _ => return Err(CertificateError::Unrecognised),
            }
        }
    };
    parse(&der)?;
    Ok(der)
}

/// The DER inside the first `-----BEGIN CERTIFICATE-----` block of `text`.
fn first_pem_certificate(text: &str) -> Result<Vec<u8>, CertificateError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text
        .find(BEGIN)
        .ok_or(CertificateError::NoCertificateBlock)?
        + BEGIN.len();
    let rest = &text[start..];
    let end = rest.find(END).ok_or(CertificateError::MalformedPem(
        "missing -----END CERTIFICATE-----",
    ))?;
    let body: String = rest[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if body.is_empty() {
        return Err(CertificateError::MalformedPem("empty body"));
    }
    LENIENT_B64
        .decode(body.as_bytes())
        .map_err(|_| CertificateError::MalformedPem("body is not base64"))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertificateError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(CertificateError::InvalidDer(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        ))),
        Err(e) => Err(CertificateError::InvalidDer(e.to_string())),
    }
}

/// The `info` object DPS computes from a certificate (service-api.md §4.4).
pub fn certificate_info(der: &[u8]) -> Result<X509CertificateInfo, CertificateError> {
    let cert = parse(der)?;
    Ok(X509CertificateInfo {
        subject_name: dotnet_name(cert.subject()),
        sha1_thumbprint: hex::encode_upper(Sha1::digest(der)),
        sha256_thumbprint: hex::encode_upper(Sha256::digest(der)),
        issuer_name: dotnet_name(cert.issuer()),
        not_before_utc: format_time(to_utc(cert.validity().not_before)?),
        not_after_utc: format_time(to_utc(cert.validity().not_after)?),
        serial_number: hex::encode_upper(cert.raw_serial()),
        version: cert.version().0 + 1,
    })
}

fn to_utc(t: ASN1Time) -> Result<DateTime<Utc>, CertificateError> {
    DateTime::<Utc>::from_timestamp(t.timestamp(), 0).ok_or(CertificateError::InvalidTime)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as DPS writes `notBeforeUtc` / `notAfterUtc`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A distinguished name the way .NET's `X500DistinguishedName.Name` prints it: RDNs in reverse
/// DER order joined by `, `, multi-valued RDNs joined by ` + `, Windows short names, unknown
/// attribute types as `OID.<dotted>`, values quoted when they hold special characters.
pub fn dotnet_name(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(format_attribute)
                .collect::<Vec<_>>()
                .join(" + ")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(", ")
}

fn format_attribute(attr: &AttributeTypeAndValue<'_>) -> String {
    let oid = attr.attr_type().to_id_string();
    let label = match short_name(&oid) {
        Some(s) => s.to_owned(),
        None => format!("OID.{oid}"),
    };
    format!("{label}={}", attribute_value(attr))
}

/// Short names Windows (CryptoAPI, which .NET uses) prints for attribute types.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "S",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "T",
        "2.5.4.42" => "G",
        "2.5.4.43" => "I",
        "1.2.840.113549.1.9.1" => "E",
        "0.9.2342.19200300.100.1.25" => "DC",
        _ => return None,
    })
}

fn attribute_value(attr: &AttributeTypeAndValue<'_>) -> String {
    let value = attr.attr_value();
    let data = value.data;
    let text = match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => String::from_utf8_lossy(data).into_owned(),
        // T.61 in practice carries Latin-1.
        Tag::T61String => data.iter().map(|&b| char::from(b)).collect(),
        Tag::BmpString => {
            let units: Vec<u16> = data
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        Tag::UniversalString => data
            .chunks(4)
            .map(|c| {
                let mut b = [0u8; 4];
                b[..c.len()].copy_from_slice(c);
                char::from_u32(u32::from_be_bytes(b)).unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
        // Not a string: `#` and the hex of the value's DER, as Windows prints it.
        _ => {
            let der = value.to_der_vec().unwrap_or_else(|_| data.to_vec());
            return format!("#{}", hex::encode_upper(der));
        }
    };
    quote_if_needed(&text)
}

fn quote_if_needed(value: &str) -> String {
    let edge_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    let needs = value.starts_with(edge_space)
        || value.ends_with(edge_space)
        || value
            .chars()
            .any(|c| matches!(c, ',' | '+' | '=' | '"' | '\n' | '<' | '>' | '#' | ';'));
    if needs {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// An owned, parsed X.509 certificate with the facts attestation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    der: Vec<u8>,
    common_name: Option<String>,
    subject_name: String,
    issuer_name: String,
    is_ca: bool,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
}

impl Certificate {
    /// Parses DER (the whole input must be one certificate).
    pub fn from_der(der: Vec<u8>) -> Result<Self, CertificateError> {
        let cert = parse(&der)?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .map(attribute_value_plain);
        let subject_name = dotnet_name(cert.subject());
        let issuer_name = dotnet_name(cert.issuer());
        let is_ca = cert.is_ca();
        let not_before = to_utc(cert.validity().not_before)?;
        let not_after = to_utc(cert.validity().not_after)?;
        Ok(Self {
            der,
            common_name,
            subject_name,
            issuer_name,
            is_ca,
            not_before,
            not_after,
        })
    }

    /// Parses any input form [`decode_certificate`] accepts.
    pub fn parse(input: &str) -> Result<Self, CertificateError> {
        Self::from_der(decode_certificate(input)?)
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The first subject CN (DER order), unquoted — the registration id of a device leaf.
    pub fn common_name(&self) -> Option<String> {
        self.common_name.clone()
    }

    /// Subject in .NET `X500DistinguishedName.Name` style.
    pub fn subject_name(&self) -> &str {
        &self.subject_name
    }

    /// Issuer in .NET `X500DistinguishedName.Name` style.
    pub fn issuer_name(&self) -> &str {
        &self.issuer_name
    }

    /// Upper-case hex SHA-1 of the DER.
    pub fn sha1_thumbprint(&self) -> String {
        hex::encode_upper(Sha1::digest(&self.der))
    }

    /// Upper-case hex SHA-256 of the DER.
    pub fn sha256_thumbprint(&self) -> String {
        hex::encode_upper(Sha256::digest(&self.der))
    }

    /// `basicConstraints` has `cA: TRUE`.
    pub fn is_ca(&self) -> bool {
        self.is_ca
    }

    pub fn not_before(&self) -> DateTime<Utc> {
        self.not_before
    }

    pub fn not_after(&self) -> DateTime<Utc> {
        self.not_after
    }

    /// The `info` object for this certificate.
    pub fn info(&self) -> Result<X509CertificateInfo, CertificateError> {
        certificate_info(&self.der)
    }
}

/// An attribute value as text without .NET quoting (for CN → registration id).
fn attribute_value_plain(attr: &AttributeTypeAndValue<'_>) -> String {
    let quoted = attribute_value(attr);
    match quoted.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) if quoted.len() >= 2 => inner.replace("\"\"", "\""),
        _ => quoted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, DnType, DnValue, IsCa, KeyPair,
        KeyUsagePurpose, SerialNumber,
    };

    struct Issued {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn params(dn: &[(DnType, &str)], ca: bool) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (ty, v) in dn {
            p.distinguished_name.push(ty.clone(), *v);
        }
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        p.not_before = date_time_ymd(2023, 5, 19);
        p.not_after = date_time_ymd(2033, 5, 20);
        p
    }

    fn self_signed(p: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Issued { cert, key }
    }

    fn signed(p: CertificateParams, issuer: &Issued) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
        Issued { cert, key }
    }

    fn sha256_upper(der: &[u8]) -> String {
        Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    fn sha1_upper(der: &[u8]) -> String {
        Sha1::digest(der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    #[test]
    fn self_signed_leaf_info() {
        let mut p = params(&[(DnType::CommonName, "enroll_cert_c47537a6")], false);
        p.serial_number = Some(SerialNumber::from_slice(&[
            0x51, 0xA8, 0xF6, 0x24, 0xFF, 0x9D, 0x18, 0x39, 0x20, 0x29,
        ]));
        let leaf = self_signed(p);
        let der = leaf.cert.der().to_vec();
        let info = certificate_info(&der).unwrap();
        assert_eq!(info.subject_name, "CN=enroll_cert_c47537a6");
        assert_eq!(info.issuer_name, "CN=enroll_cert_c47537a6");
        assert_eq!(info.sha256_thumbprint, sha256_upper(&der));
        assert_eq!(info.sha1_thumbprint, sha1_upper(&der));
        assert_eq!(info.sha1_thumbprint.len(), 40);
        assert_eq!(info.sha256_thumbprint.len(), 64);
        assert_eq!(info.serial_number, "51A8F624FF9D18392029");
        assert_eq!(info.not_before_utc, "2023-05-19T00:00:00Z");
        assert_eq!(info.not_after_utc, "2033-05-20T00:00:00Z");
        assert_eq!(info.version, 3);

        let cert = Certificate::from_der(der.clone()).unwrap();
        assert_eq!(cert.common_name().as_deref(), Some("enroll_cert_c47537a6"));
        assert!(!cert.is_ca());
        assert_eq!(cert.sha256_thumbprint(), info.sha256_thumbprint);
        assert_eq!(cert.sha1_thumbprint(), info.sha1_thumbprint);
        assert_eq!(format_time(cert.not_before()), info.not_before_utc);
        assert_eq!(format_time(cert.not_after()), info.not_after_utc);
        assert_eq!(cert.info().unwrap(), info);
        assert_eq!(cert.der(), der.as_slice());
    }

    #[test]
    fn serial_keeps_the_sign_padding_byte() {
        // 0x80.. needs a leading 00 in DER; .NET's SerialNumber shows it.
        let mut p = params(&[(DnType::CommonName, "dev")], false);
        p.serial_number = Some(SerialNumber::from_slice(&[0x80, 0x01, 0xAB]));
        let leaf = self_signed(p);
        let info = certificate_info(leaf.cert.der()).unwrap();
        assert_eq!(info.serial_number, "008001AB");
    }

    #[test]
    fn chain_names_and_ca_flags() {
        let root = self_signed(params(
            &[
                (DnType::CountryName, "US"),
                (DnType::OrganizationName, "Contoso"),
                (DnType::CommonName, "Contoso Root CA"),
            ],
            true,
        ));
        let inter = signed(
            params(
                &[
                    (DnType::CountryName, "US"),
                    (DnType::OrganizationName, "Contoso"),
                    (DnType::OrganizationalUnitName, "Devices"),
                    (DnType::CommonName, "Contoso Intermediate"),
                ],
                true,
            ),
            &root,
        );
        let leaf = signed(
            params(
                &[
                    (DnType::CountryName, "US"),
                    (DnType::OrganizationName, "Org"),
                    (DnType::CommonName, "dev"),
                ],
                false,
            ),
            &inter,
        );

        let root_info = certificate_info(root.cert.der()).unwrap();
        assert_eq!(
            root_info.subject_name,
            "CN=Contoso Root CA, O=Contoso, C=US"
        );
        assert_eq!(root_info.issuer_name, root_info.subject_name);

        let inter_info = certificate_info(inter.cert.der()).unwrap();
        assert_eq!(
            inter_info.subject_name,
            "CN=Contoso Intermediate, OU=Devices, O=Contoso, C=US"
        );
        assert_eq!(
            inter_info.issuer_name,
            "CN=Contoso Root CA, O=Contoso, C=US"
        );

        let leaf_info = certificate_info(leaf.cert.der()).unwrap();
        assert_eq!(leaf_info.subject_name, "CN=dev, O=Org, C=US");
        assert_eq!(
            leaf_info.issuer_name,
            "CN=Contoso Intermediate, OU=Devices, O=Contoso, C=US"
        );
        assert_eq!(leaf_info.sha256_thumbprint, sha256_upper(leaf.cert.der()));
        assert_eq!(leaf_info.version, 3);

        let root_c = Certificate::from_der(root.cert.der().to_vec()).unwrap();
        let inter_c = Certificate::from_der(inter.cert.der().to_vec()).unwrap();
        let leaf_c = Certificate::from_der(leaf.cert.der().to_vec()).unwrap();
        assert!(root_c.is_ca());
        assert!(inter_c.is_ca());
        assert!(!leaf_c.is_ca());
        assert_eq!(leaf_c.common_name().as_deref(), Some("dev"));
        assert_eq!(leaf_c.subject_name(), "CN=dev, O=Org, C=US");
        assert_eq!(leaf_c.issuer_name(), inter_info.subject_name);
    }

    #[test]
    fn other_attribute_names_and_quoting() {
        let p = params(
            &[
                (DnType::CountryName, "DE"),
                (DnType::StateOrProvinceName, "Bayern"),
                (DnType::LocalityName, "München"),
                (
                    DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                    "ops@example.com",
                ),
                (DnType::CustomDnType(vec![2, 5, 4, 65]), "nick"),
                (DnType::OrganizationName, "Acme, Inc."),
                (DnType::CommonName, " padded"),
            ],
            false,
        );
        let cert = self_signed(p);
        let info = certificate_info(cert.cert.der()).unwrap();
        assert_eq!(
            info.subject_name,
            "CN=\" padded\", O=\"Acme, Inc.\", OID.2.5.4.65=nick, E=ops@example.com, L=München, S=Bayern, C=DE"
        );
        let c = Certificate::from_der(cert.cert.der().to_vec()).unwrap();
        assert_eq!(c.common_name().as_deref(), Some(" padded"));
    }

    #[test]
    fn string_types_are_decoded() {
        let mut p = params(&[], false);
        p.distinguished_name.push(
            DnType::CommonName,
            DnValue::PrintableString("printable".try_into().unwrap()),
        );
        p.distinguished_name.push(
            DnType::OrganizationName,
            DnValue::BmpString("bmp\u{e9}".try_into().unwrap()),
        );
        p.distinguished_name.push(
            DnType::OrganizationalUnitName,
            DnValue::Ia5String("ia5".try_into().unwrap()),
        );
        p.distinguished_name.push(
            DnType::LocalityName,
            DnValue::UniversalString("univ\u{1F600}".try_into().unwrap()),
        );
        let cert = self_signed(p);
        let info = certificate_info(cert.cert.der()).unwrap();
        assert_eq!(
            info.subject_name,
            "L=univ\u{1F600}, OU=ia5, O=bmp\u{e9}, CN=printable"
        );
    }

    #[test]
    fn quoting_rules() {
        assert_eq!(quote_if_needed("plain value"), "plain value");
        assert_eq!(quote_if_needed("a=b"), "\"a=b\"");
        assert_eq!(quote_if_needed("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote_if_needed("trailing "), "\"trailing \"");
        assert_eq!(quote_if_needed("#tag"), "\"#tag\"");
        assert_eq!(quote_if_needed(""), "");
    }

    #[test]
    fn all_input_forms_decode_to_the_same_der() {
        let leaf = self_signed(params(&[(DnType::CommonName, "forms")], false));
        let der = leaf.cert.der().to_vec();
        let pem = leaf.cert.pem();
        let b64_der = STANDARD.encode(&der);
        let wrapped_der: String = b64_der
            .as_bytes()
            .chunks(64)
            .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
            .collect();
        let b64_pem = STANDARD.encode(pem.as_bytes());
        let indented_pem = format!("\n   {}\n", pem.replace('\n', "\n   "));

        for (name, input) in [
            ("pem", pem.as_str()),
            ("pem crlf", &pem.replace('\n', "\r\n")),
            ("pem indented", &indented_pem),
            ("base64 der", &b64_der),
            ("base64 der wrapped", &wrapped_der),
            ("base64 der unpadded", b64_der.trim_end_matches('=')),
            ("base64 pem", &b64_pem),
        ] {
            assert_eq!(
                decode_certificate(input).as_deref(),
                Ok(der.as_slice()),
                "{name}"
            );
        }
        assert_eq!(Certificate::parse(&pem).unwrap().der(), der.as_slice());
    }

    #[test]
    fn first_certificate_block_wins() {
        let a = self_signed(params(&[(DnType::CommonName, "first")], false));
        let b = self_signed(params(&[(DnType::CommonName, "second")], false));
        let key_pem = a.key.serialize_pem();
        let bundle = format!("{key_pem}{}{}", a.cert.pem(), b.cert.pem());
        assert_eq!(decode_certificate(&bundle).unwrap(), a.cert.der().to_vec());
        let b64_bundle = STANDARD.encode(bundle.as_bytes());
        assert_eq!(
            decode_certificate(&b64_bundle).unwrap(),
            a.cert.der().to_vec()
        );
    }

    #[test]
    fn garbage_is_refused_with_what_was_expected() {
        let leaf = self_signed(params(&[(DnType::CommonName, "x")], false));
        let pem = leaf.cert.pem();
        let cases: Vec<(String, CertificateError)> = vec![
            (String::new(), CertificateError::Empty),
            ("  \n ".into(), CertificateError::Empty),
            ("hello world!".into(), CertificateError::Unrecognised),
            (
                STANDARD.encode("just some text"),
                CertificateError::Unrecognised,
            ),
            (
                leaf.key.serialize_pem(),
                CertificateError::NoCertificateBlock,
            ),
            (
                pem.replace("-----END CERTIFICATE-----", ""),
                CertificateError::MalformedPem("missing -----END CERTIFICATE-----"),
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".into(),
                CertificateError::MalformedPem("body is not base64"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(decode_certificate(&input), Err(want), "{input:?}");
        }
        // Base64 of something DER-looking that is not a certificate.
        let err = decode_certificate(&STANDARD.encode([0x30, 0x03, 0x02, 0x01, 0x01])).unwrap_err();
        assert!(matches!(err, CertificateError::InvalidDer(_)), "{err:?}");
        // Trailing bytes after a certificate.
        let mut der = leaf.cert.der().to_vec();
        der.push(0);
        let err = decode_certificate(&STANDARD.encode(&der)).unwrap_err();
        assert!(matches!(err, CertificateError::InvalidDer(_)), "{err:?}");

        let msg = CertificateError::Unrecognised.to_string();
        assert!(msg.contains("PEM") && msg.contains("DER"), "{msg}");
        assert!(certificate_info(b"nope").is_err());
    }
}
