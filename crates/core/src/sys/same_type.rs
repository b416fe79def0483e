//! Recognising, inside generic code, that a type parameter is one particular type: the one
//! place where the codec looks through serde's generics to write a slice of numbers whole.
//!
//! `unty::type_equal` compares types with their lifetimes erased. Each function here is sound
//! because of how it uses that answer: it only ever shortens a lifetime, or turns a type that
//! has no lifetime of its own into itself.

use std::mem::ManuallyDrop;

/// The slice that `iter` walks, when `I` is `std::slice::Iter` over `P`.
pub fn as_slice<'a, I, P: 'static>(iter: &'a I) -> Option<&'a [P]> {
    if !unty::type_equal::<I, std::slice::Iter<'static, P>>() {
        return None;
    }
    // SAFETY: `I` is `slice::Iter<'x, P>` for some `'x` (only lifetimes are erased in the
    // comparison, and `P: 'static` has none to differ in). `&'a I` exists, so `'x: 'a`, and
    // `slice::Iter` is covariant in its lifetime: reading it as `slice::Iter<'a, P>` only
    // shortens the borrow.
    let iter = unsafe { &*std::ptr::from_ref(iter).cast::<std::slice::Iter<'a, P>>() };
    Some(iter.as_slice())
}

/// `vec` as a `V`, when `V` is `Vec<P>`; `vec` back otherwise.
pub fn vec_as<V, P: 'static>(vec: Vec<P>) -> Result<V, Vec<P>> {
    if !unty::type_equal::<V, Vec<P>>() {
        return Err(vec);
    }
    let vec = ManuallyDrop::new(vec);
    // SAFETY: `V` is `Vec<P'>` where `P'` differs from `P` at most in lifetimes, which `P:
    // 'static` holds at `'static`: the two have one layout, and giving away a value whose
    // lifetimes are `'static` as one with shorter ones is a shortening. `vec` is not dropped.
    Ok(unsafe { std::mem::transmute_copy::<Vec<P>, V>(&vec) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_iterator_of_the_element_type_is_recognised() {
        let values = [1u64, 2, 3];
        assert_eq!(as_slice::<_, u64>(&values.iter()), Some(&values[..]));
        assert_eq!(as_slice::<_, u32>(&values.iter()), None);
        assert_eq!(as_slice::<_, u64>(&values.iter().skip(1)), None);
        // Partly consumed: what is left.
        let mut iter = values.iter();
        iter.next();
        assert_eq!(as_slice::<_, u64>(&iter), Some(&values[1..]));
    }

    #[test]
    fn a_vec_becomes_itself_and_nothing_else() {
        assert_eq!(vec_as::<Vec<u16>, u16>(vec![7]).unwrap(), vec![7]);
        assert_eq!(vec_as::<Vec<i16>, u16>(vec![7]).unwrap_err(), vec![7]);
        assert!(vec_as::<String, u8>(vec![b'a']).is_err());
    }
}
