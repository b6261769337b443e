//! TPM attestation (device-protocol.md §7): the device's endorsement key (EK) and storage root
//! key (SRK) as `TPM2B_PUBLIC`, and the activation blob that wraps an HMAC key so that only
//! that TPM can use it.
//!
//! The blob (`authenticationKey`, §7.3) is `TPM2B_ID_OBJECT ‖ TPM2B_ENCRYPTED_SECRET ‖
//! TPM2B_PRIVATE ‖ TPM2B_ENCRYPTED_SECRET ‖ TPM2B_PUBLIC ‖ TPM2B_DATA`: a credential made for
//! the EK (MakeCredential, so `TPM2_ActivateCredential` recovers a 16-byte inner wrap key only
//! in the TPM that holds the EK) and the HMAC key duplicated to the SRK under that inner key
//! (so `TPM2_Import` under the SRK accepts it). Construction per §7.4: SHA-256 names, KDFa
//! (SP 800-108 counter mode), AES-128-CFB with a zero IV, RSA-OAEP with the TPM's labels.
//!
//! Randomness comes from the caller ([`Entropy`]); nothing here keeps state.

use aes::Aes128;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use muster_proto::runtime::Entropy;
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_KEYEDHASH: u16 = 0x0008;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_AES: u16 = 0x0006;
const TPM_ALG_CFB: u16 = 0x0043;
const TPM_ALG_HMAC: u16 = 0x0005;
const TPM_ALG_NULL: u16 = 0x0010;
/// `sign | userWithAuth`: importable (neither fixedTPM nor fixedParent), usable for HMAC.
const HMAC_KEY_ATTRIBUTES: u32 = 0x0004_0000 | 0x0000_0040;
/// The credential (the inner wrap key): Import's symmetric algorithm is AES-128 in every SDK.
const INNER_WRAP_KEY_BYTES: usize = 16;
/// The largest HMAC key a TPM accepts (the SHA-256 block size).
pub const MAX_HMAC_KEY_BYTES: usize = 64;
/// A `TPM2B_PUBLIC` longer than this is not an RSA-2048/4096 key.
const MAX_PUBLIC_BYTES: usize = 1024;

/// Why a TPM key or blob could not be used; never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("the {what} is not valid base64")]
    Base64 { what: &'static str },
    #[error("the {what} is not a TPM2B_PUBLIC: {reason}")]
    Malformed {
        what: &'static str,
        reason: &'static str,
    },
    #[error("the {what} is not supported: {reason}")]
    Unsupported {
        what: &'static str,
        reason: &'static str,
    },
    #[error("the HMAC key must be 1 to {MAX_HMAC_KEY_BYTES} bytes")]
    HmacKeyLength,
    #[error("RSA-OAEP encryption to the {what} failed")]
    Encryption { what: &'static str },
}

/// An RSA storage key's public area (EK or SRK) as the device sent it.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaPublicArea {
    /// The marshalled `TPMT_PUBLIC` (without the TPM2B size).
    tpmt: Vec<u8>,
    modulus: Vec<u8>,
    exponent: u32,
}

impl std::fmt::Debug for RsaPublicArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaPublicArea({} bit)", self.modulus.len() * 8)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if self.buf.len() < n {
            return Err(TpmError::Malformed {
                what: self.what,
                reason: "it ends early",
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

impl RsaPublicArea {
    /// Parses a base64 `TPM2B_PUBLIC` (the JSON `endorsementKey` / `storageRootKey`).
    pub fn from_base64(b64: &str, what: &'static str) -> Result<Self, TpmError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| TpmError::Base64 { what })?;
        Self::parse(&raw, what)
    }

    /// Parses a marshalled `TPM2B_PUBLIC`: an RSA storage key with SHA-256 names and
    /// AES-128-CFB as its symmetric algorithm (the EK and SRK templates of §7.2).
    pub fn parse(tpm2b: &[u8], what: &'static str) -> Result<Self, TpmError> {
        if tpm2b.len() > MAX_PUBLIC_BYTES {
            return Err(TpmError::Malformed {
                what,
                reason: "it is too long",
            });
        }
        let mut outer = Reader { buf: tpm2b, what };
        let tpmt = outer.tpm2b()?;
        if !outer.buf.is_empty() {
            return Err(TpmError::Malformed {
                what,
                reason: "bytes follow the structure",
            });
        }
        let mut r = Reader { buf: tpmt, what };
        let unsupported = |reason| TpmError::Unsupported { what, reason };
        if r.u16()? != TPM_ALG_RSA {
            return Err(unsupported("only RSA keys are used by the device SDKs"));
        }
        if r.u16()? != TPM_ALG_SHA256 {
            return Err(unsupported("its name algorithm is not SHA-256"));
        }
        let _attributes = r.u32()?;
        let _auth_policy = r.tpm2b()?;
        let sym = r.u16()?;
        if sym != TPM_ALG_AES {
            return Err(unsupported("its symmetric algorithm is not AES"));
        }
        let (bits, mode) = (r.u16()?, r.u16()?);
        if bits != 128 || mode != TPM_ALG_CFB {
            return Err(unsupported("its symmetric algorithm is not AES-128-CFB"));
        }
        let scheme = r.u16()?;
        if scheme != TPM_ALG_NULL {
            let _hash = r.u16()?;
        }
        let key_bits = r.u16()?;
        let exponent = match r.u32()? {
            0 => 65537,
            e => e,
        };
        let modulus = r.tpm2b()?;
        if !r.buf.is_empty() {
            return Err(TpmError::Malformed {
                what,
                reason: "bytes follow the public area",
            });
        }
        if !(2048..=4096).contains(&key_bits) || modulus.len() * 8 != key_bits as usize {
            return Err(unsupported("its RSA modulus is not 2048 to 4096 bits"));
        }
        Ok(Self {
            tpmt: tpmt.to_vec(),
            modulus: modulus.to_vec(),
            exponent,
        })
    }

    /// `Name = nameAlg ‖ SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        name(&self.tpmt)
    }

    /// Whether both areas hold the same RSA key (modulus and exponent); attributes and
    /// policies of two marshallings of one key may differ.
    pub fn same_key(&self, other: &RsaPublicArea) -> bool {
        use subtle::ConstantTimeEq;
        self.exponent == other.exponent && bool::from(self.modulus.ct_eq(&other.modulus))
    }

    /// SHA-256 of the RSA key (exponent and modulus): identifies the key whatever its
    /// attributes, without keeping the public area.
    pub fn key_digest(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(self.exponent.to_be_bytes())
            .chain_update(&self.modulus)
            .finalize()
            .into()
    }

    fn rsa(&self, what: &'static str) -> Result<RsaPublicKey, TpmError> {
        RsaPublicKey::new(
            BigUint::from_bytes_be(&self.modulus),
            BigUint::from(self.exponent),
        )
        .map_err(|_| TpmError::Unsupported {
            what,
            reason: "its RSA key is not usable",
        })
    }
}

fn name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(&Sha256::digest(tpmt_public));
    n
}

/// The registration id the C and Node SDKs derive from an EK (§7.2): lower-case base32
/// (RFC 4648 alphabet, no padding) of SHA-256 of the `TPM2B_PUBLIC` bytes.
pub fn registration_id(ek_tpm2b: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Sha256::digest(ek_tpm2b);
    let mut out = String::with_capacity(52);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &byte in digest.iter() {
        acc = (acc << 8) | byte as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// KDFa with HMAC-SHA256 (SP 800-108 counter mode, TPM 2.0 part 1 §11.4.10.2).
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter = 1u32;
    while out.len() < bytes {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

fn aes128_cfb(key: &[u8], data: &mut [u8]) {
    cfb_mode::Encryptor::<Aes128>::new(key.into(), &[0u8; 16].into()).encrypt(data);
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn push_tpm2b(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

fn tpm2b(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    push_tpm2b(&mut out, data);
    out
}

/// `rand_core` randomness over the caller's [`Entropy`], for RSA-OAEP padding.
struct EntropyRng<'a>(&'a dyn Entropy);

impl rand_core::RngCore for EntropyRng<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for EntropyRng<'_> {}

fn random<const N: usize>(entropy: &dyn Entropy) -> [u8; N] {
    let mut b = [0u8; N];
    entropy.fill(&mut b);
    b
}

/// The marshalled `TPMT_PUBLIC` of an importable HMAC-SHA256 key bound to `key` by
/// `unique = SHA-256(obfuscation ‖ key)`.
fn hmac_key_public(unique: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(48);
    p.extend_from_slice(&TPM_ALG_KEYEDHASH.to_be_bytes());
    p.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    p.extend_from_slice(&HMAC_KEY_ATTRIBUTES.to_be_bytes());
    push_tpm2b(&mut p, &[]); // authPolicy
    p.extend_from_slice(&TPM_ALG_HMAC.to_be_bytes());
    p.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    push_tpm2b(&mut p, unique);
    p
}

/// Builds the activation blob (§7.3) that gives `hmac_key` to the TPM holding `ek` and `srk`.
pub fn activation_blob(
    ek: &RsaPublicArea,
    srk: &RsaPublicArea,
    hmac_key: &[u8],
    entropy: &dyn Entropy,
) -> Result<Vec<u8>, TpmError> {
    if hmac_key.is_empty() || hmac_key.len() > MAX_HMAC_KEY_BYTES {
        return Err(TpmError::HmacKeyLength);
    }
    let mut rng = EntropyRng(entropy);

    // B. MakeCredential: the inner wrap key, readable by ActivateCredential(SRK, EK) only.
    let inner_wrap_key: [u8; INNER_WRAP_KEY_BYTES] = random(entropy);
    let seed: [u8; 32] = random(entropy);
    let enc_secret = ek
        .rsa("endorsement key")?
        .encrypt(
            &mut rng,
            Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|_| TpmError::Encryption {
            what: "endorsement key",
        })?;
    let srk_name = srk.name();
    let sym_key = kdfa(&seed, "STORAGE", &srk_name, &[], 128);
    let mut enc_identity = tpm2b(&inner_wrap_key);
    aes128_cfb(&sym_key, &mut enc_identity);
    let integrity_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let integrity = hmac(&integrity_key, &[&enc_identity, &srk_name]);
    let mut id_object = tpm2b(&integrity);
    id_object.extend_from_slice(&enc_identity);

    // C. The HMAC key object.
    let obfuscation: [u8; 32] = random(entropy);
    let unique = Sha256::new()
        .chain_update(obfuscation)
        .chain_update(hmac_key)
        .finalize();
    let key_public = hmac_key_public(&unique);
    let mut sensitive = TPM_ALG_KEYEDHASH.to_be_bytes().to_vec();
    push_tpm2b(&mut sensitive, &[]); // authValue
    push_tpm2b(&mut sensitive, &obfuscation); // seedValue
    push_tpm2b(&mut sensitive, hmac_key);
    let sens2b = tpm2b(&sensitive);

    // D. Duplication to the SRK: inner wrapper under the credential, outer under a seed for
    // the SRK.
    let key_name = name(&key_public);
    let inner_integrity = Sha256::new()
        .chain_update(&sens2b)
        .chain_update(&key_name)
        .finalize();
    let mut enc_sensitive = tpm2b(&inner_integrity);
    enc_sensitive.extend_from_slice(&sens2b);
    aes128_cfb(&inner_wrap_key, &mut enc_sensitive);
    let seed2: [u8; 32] = random(entropy);
    let in_sym_seed = srk
        .rsa("storage root key")?
        .encrypt(
            &mut rng,
            Oaep::new_with_label::<Sha256, _>("DUPLICATE\0"),
            &seed2,
        )
        .map_err(|_| TpmError::Encryption {
            what: "storage root key",
        })?;
    let sym_key2 = kdfa(&seed2, "STORAGE", &key_name, &[], 128);
    aes128_cfb(&sym_key2, &mut enc_sensitive);
    let dup_sensitive = enc_sensitive;
    let integrity_key2 = kdfa(&seed2, "INTEGRITY", &[], &[], 256);
    let outer_hmac = hmac(&integrity_key2, &[&dup_sensitive, &key_name]);
    let mut duplicate = tpm2b(&outer_hmac);
    duplicate.extend_from_slice(&dup_sensitive);

    let mut blob = Vec::with_capacity(800);
    push_tpm2b(&mut blob, &id_object);
    push_tpm2b(&mut blob, &enc_secret);
    push_tpm2b(&mut blob, &duplicate);
    push_tpm2b(&mut blob, &in_sym_seed);
    push_tpm2b(&mut blob, &key_public);
    push_tpm2b(&mut blob, &[]); // encrypted URI data: read by C# and Node, ignored
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::runtime::OsEntropy;
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    use rsa::RsaPrivateKey;

    const EK_PEM: &str = include_str!("../tests/data/tpm_ek_test_key.pem");
    const SRK_PEM: &str = include_str!("../tests/data/tpm_srk_test_key.pem");

    /// A `TPM2B_PUBLIC` shaped like the EK/SRK templates (§7.2) for `key`.
    fn public_area(key: &RsaPrivateKey, attributes: u32, policy: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&TPM_ALG_RSA.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        p.extend_from_slice(&attributes.to_be_bytes());
        push_tpm2b(&mut p, policy);
        p.extend_from_slice(&TPM_ALG_AES.to_be_bytes());
        p.extend_from_slice(&128u16.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_CFB.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        p.extend_from_slice(&2048u16.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        push_tpm2b(&mut p, &key.n().to_bytes_be());
        tpm2b(&p)
    }

    fn keys() -> (RsaPrivateKey, RsaPrivateKey) {
        (
            RsaPrivateKey::from_pkcs1_pem(EK_PEM).unwrap(),
            RsaPrivateKey::from_pkcs1_pem(SRK_PEM).unwrap(),
        )
    }

    fn aes128_cfb_decrypt(key: &[u8], data: &mut [u8]) {
        cfb_mode::Decryptor::<Aes128>::new(key.into(), &[0u8; 16].into()).decrypt(data);
    }

    fn split(mut r: Reader<'_>, n: usize) -> Vec<Vec<u8>> {
        let parts = (0..n).map(|_| r.tpm2b().unwrap().to_vec()).collect();
        assert!(r.buf.is_empty(), "trailing bytes");
        parts
    }

    /// What a TPM does with the blob (ActivateCredential, then Import), in software with the
    /// private keys: returns the HMAC key it would load.
    fn activate_and_import(
        blob: &[u8],
        ek: &RsaPrivateKey,
        srk: &RsaPrivateKey,
        srk_public: &RsaPublicArea,
    ) -> Vec<u8> {
        let parts = split(
            Reader {
                buf: blob,
                what: "blob",
            },
            6,
        );
        let (id_object, enc_secret, duplicate, in_sym_seed, key_public) =
            (&parts[0], &parts[1], &parts[2], &parts[3], &parts[4]);
        assert!(parts[5].is_empty());

        // ActivateCredential(SRK, EK).
        let seed = ek
            .decrypt(Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), enc_secret)
            .unwrap();
        let mut r = Reader {
            buf: id_object,
            what: "id",
        };
        let integrity = r.tpm2b().unwrap().to_vec();
        let mut enc_identity = r.buf.to_vec();
        let srk_name = srk_public.name();
        let expected = hmac(
            &kdfa(&seed, "INTEGRITY", &[], &[], 256),
            &[&enc_identity, &srk_name],
        );
        assert_eq!(integrity, expected, "credential integrity");
        aes128_cfb_decrypt(
            &kdfa(&seed, "STORAGE", &srk_name, &[], 128),
            &mut enc_identity,
        );
        let inner = split(
            Reader {
                buf: &enc_identity,
                what: "identity",
            },
            1,
        )
        .remove(0);
        assert_eq!(inner.len(), 16);

        // Import(SRK, inner, public, duplicate, inSymSeed).
        let seed2 = srk
            .decrypt(
                Oaep::new_with_label::<Sha256, _>("DUPLICATE\0"),
                in_sym_seed,
            )
            .unwrap();
        let key_name = name(key_public);
        let mut r = Reader {
            buf: duplicate,
            what: "dup",
        };
        let outer = r.tpm2b().unwrap().to_vec();
        let mut dup = r.buf.to_vec();
        assert_eq!(
            outer,
            hmac(
                &kdfa(&seed2, "INTEGRITY", &[], &[], 256),
                &[&dup, &key_name]
            ),
            "outer integrity"
        );
        aes128_cfb_decrypt(&kdfa(&seed2, "STORAGE", &key_name, &[], 128), &mut dup);
        aes128_cfb_decrypt(&inner, &mut dup);
        let mut r = Reader {
            buf: &dup,
            what: "sens",
        };
        let inner_integrity = r.tpm2b().unwrap().to_vec();
        let sens2b = r.buf.to_vec();
        assert_eq!(
            inner_integrity,
            Sha256::new()
                .chain_update(&sens2b)
                .chain_update(&key_name)
                .finalize()
                .to_vec(),
            "inner integrity"
        );
        let sensitive = split(
            Reader {
                buf: &sens2b,
                what: "s",
            },
            1,
        )
        .remove(0);
        let mut r = Reader {
            buf: &sensitive,
            what: "s",
        };
        assert_eq!(r.u16().unwrap(), TPM_ALG_KEYEDHASH);
        assert!(r.tpm2b().unwrap().is_empty());
        let obfuscation = r.tpm2b().unwrap().to_vec();
        let key = r.tpm2b().unwrap().to_vec();
        assert!(r.buf.is_empty());
        // Load's binding check.
        let unique = Sha256::new()
            .chain_update(&obfuscation)
            .chain_update(&key)
            .finalize();
        assert_eq!(key_public, &hmac_key_public(&unique));
        key
    }

    #[test]
    fn kdfa_matches_the_spec_vectors() {
        let key: Vec<u8> = (0u8..32).collect();
        let mut ctx = vec![0x00, 0x0b];
        ctx.extend_from_slice(&[0u8; 32]);
        assert_eq!(
            hex::encode(kdfa(&key, "STORAGE", &ctx, &[], 128)),
            "4535165c7f0dc2bd1abef241c5893af0"
        );
        assert_eq!(
            hex::encode(kdfa(&key, "INTEGRITY", &[], &[], 256)),
            "bacf689f634ece301e1f1b15b072d9c87db6a69585db42b1a0cb8f73ebe2692e"
        );
    }

    #[test]
    fn blob_gives_the_key_to_the_tpm_holding_ek_and_srk_only() {
        let (ek, srk) = keys();
        let ek_pub = RsaPublicArea::parse(&public_area(&ek, 0x000300b2, &[7; 32]), "ek").unwrap();
        let srk_pub = RsaPublicArea::parse(&public_area(&srk, 0x00030472, &[]), "srk").unwrap();
        let key = [0x5a; 32];
        let blob = activation_blob(&ek_pub, &srk_pub, &key, &OsEntropy).unwrap();
        // §7.4: 54 + 258 + 144 + 258 + 50 + 2 for RSA-2048 and a 32-byte key.
        assert_eq!(blob.len(), 766);
        assert_eq!(activate_and_import(&blob, &ek, &srk, &srk_pub), key);

        // A TPM with another EK cannot activate it (OAEP fails to decrypt the seed).
        let swapped = std::panic::catch_unwind(|| activate_and_import(&blob, &srk, &srk, &srk_pub));
        assert!(swapped.is_err());
    }

    #[test]
    fn public_areas_parse_and_compare_by_key() {
        let (ek, srk) = keys();
        let a = RsaPublicArea::parse(&public_area(&ek, 0x000300b2, &[1; 32]), "ek").unwrap();
        let b = RsaPublicArea::parse(&public_area(&ek, 0x00030472, &[]), "ek").unwrap();
        let c = RsaPublicArea::parse(&public_area(&srk, 0x000300b2, &[1; 32]), "ek").unwrap();
        assert!(a.same_key(&b));
        assert!(!a.same_key(&c));
        assert_eq!(a.key_digest(), b.key_digest());
        assert_ne!(a.key_digest(), c.key_digest());
        assert_ne!(a.name(), b.name());

        let raw = public_area(&ek, 0x000300b2, &[]);
        assert!(matches!(
            RsaPublicArea::parse(&raw[..raw.len() - 1], "ek"),
            Err(TpmError::Malformed { .. })
        ));
        let mut ecc = raw.clone();
        ecc[3] = 0x23; // TPM_ALG_ECC
        assert!(matches!(
            RsaPublicArea::parse(&ecc, "ek"),
            Err(TpmError::Unsupported { .. })
        ));
        assert!(matches!(
            RsaPublicArea::from_base64("not base64!", "ek"),
            Err(TpmError::Base64 { .. })
        ));
        assert!(matches!(
            activation_blob(&a, &c, &[0; 65], &OsEntropy),
            Err(TpmError::HmacKeyLength)
        ));
    }

    #[test]
    fn registration_id_is_lower_base32_of_the_ek_digest() {
        // SHA-256("") = e3b0c442…; its base32 starts "4oymiquy".
        let id = registration_id(b"");
        assert_eq!(id.len(), 52);
        assert!(id.starts_with("4oymiquy"), "{id}");
        assert!(id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
    }
}
