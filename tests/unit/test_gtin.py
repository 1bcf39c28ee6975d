"""GTIN normalisation: python-stdnum check digits, GTIN-14 keys, and specific reasons for bad lines."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stdnum import ean

from shared.gtin import InvalidUpcError, normalize_gtin


def with_check(body: str) -> str:
    return body + ean.calc_check_digit(body)


@pytest.mark.parametrize(
    "raw,gtin14,kind",
    [
        ("036000291452", "00036000291452", "UPC-A"),
        ("4006381333931", "04006381333931", "EAN-13"),
        ("96385074", "00000096385074", "EAN-8"),
        ("10036000291459", "10036000291459", "GTIN-14"),
        ("  036000291452 ", "00036000291452", "UPC-A"),
    ],
)
def test_valid_codes_normalise_to_gtin14(raw, gtin14, kind):
    g = normalize_gtin(raw)
    assert (g.gtin14, g.kind) == (gtin14, kind)


@pytest.mark.parametrize(
    "raw,code,fragment",
    [
        ("036000291453", "bad_check_digit", "expected 2"),
        ("10036000291458", "bad_check_digit", "GTIN-14"),
        ("36000291452", "bad_length", "lost its leading zero"),
        ("7.2E+11", "scientific_notation", "spreadsheet"),
        ("03600029145X", "not_digits", "'X'"),
        ("", "empty", "empty"),
        ("1234567890", "bad_length", "10 digits"),
    ],
)
def test_invalid_codes_give_specific_reasons(raw, code, fragment):
    with pytest.raises(InvalidUpcError) as err:
        normalize_gtin(raw)
    assert err.value.code == code
    assert fragment in err.value.message


@given(st.sampled_from([7, 11, 12, 13]).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n)))
def test_any_body_with_its_check_digit_is_valid_and_stable(body):
    code = with_check(body)
    g = normalize_gtin(code)
    assert len(g.gtin14) == 14 and g.gtin14.lstrip("0") == code.lstrip("0")
    assert normalize_gtin(g.gtin14).gtin14 == g.gtin14


@given(st.sampled_from([7, 11, 12, 13]).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n)),
       st.integers(1, 9))
def test_any_wrong_check_digit_is_rejected(body, delta):
    good = with_check(body)
    bad = good[:-1] + str((int(good[-1]) + delta) % 10)
    with pytest.raises(InvalidUpcError) as err:
        normalize_gtin(bad)
    assert err.value.code == "bad_check_digit"
