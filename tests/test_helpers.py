"""The shared test helpers check what they are asked to check."""

import numpy as np

from tests.test_case import TestCase


class AssertAllCloseTest(TestCase):
    def test_close_structures_pass(self):
        self.assertAllClose(
            {"a": np.ones(3), "b": [np.zeros(2), 1.0]},
            {"a": np.ones(3) + 1e-8, "b": [np.zeros(2), 1.0]},
        )

    def test_a_different_value_fails(self):
        with self.assertRaises(AssertionError):
            self.assertAllClose(np.array([1.0, 2.0]), np.array([1.0, 2.1]))

    def test_an_array_against_a_list_fails_on_the_structure(self):
        # The array [1, 1] and the list [1, 2] hold different numbers, but a
        # pairwise comparison would see the array and the list's first
        # number, which agree: the structure check must come first.
        with self.assertRaisesRegex(AssertionError, "structures differ"):
            self.assertAllClose(np.array([1.0, 1.0]), [1.0, 2.0])
        self.assertAllClose(np.array([1.0, 2.0]), np.array([1.0, 2.0]))

    def test_not_all_close(self):
        self.assertNotAllClose(np.zeros(2), np.ones(2))
        with self.assertRaises(AssertionError):
            self.assertNotAllClose(np.zeros(2), np.zeros(2))

    def test_not_all_close_fails_on_different_structures(self):
        # Not "not close": the comparison itself is wrong.
        with self.assertRaisesRegex(AssertionError, "structures differ"):
            self.assertNotAllClose(np.zeros(2), [1.0, 2.0, 3.0])
