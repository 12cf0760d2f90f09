//! The label sets of the Bitext data: 11 categories and 27 intents (each intent in exactly one category).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[doc = concat!("`", $text, "`")] #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every label, in the dataset's alphabetical order (the order prompts list them in).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label exactly as the dataset spells it.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Position of this label in [`Self::ALL`].
            pub fn index(self) -> usize {
                Self::ALL.iter().position(|l| *l == self).unwrap_or(0)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(Self::ALL.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// The 11 categories (Task 1).
    Category {
        Account => "ACCOUNT",
        Cancel => "CANCEL",
        Contact => "CONTACT",
        Delivery => "DELIVERY",
        Feedback => "FEEDBACK",
        Invoice => "INVOICE",
        Order => "ORDER",
        Payment => "PAYMENT",
        Refund => "REFUND",
        Shipping => "SHIPPING",
        Subscription => "SUBSCRIPTION",
    }
}

label_enum! {
    /// The 27 intents (Task 1, harder variant).
    Intent {
        CancelOrder => "cancel_order",
        ChangeOrder => "change_order",
        ChangeShippingAddress => "change_shipping_address",
        CheckCancellationFee => "check_cancellation_fee",
        CheckInvoice => "check_invoice",
        CheckPaymentMethods => "check_payment_methods",
        CheckRefundPolicy => "check_refund_policy",
        Complaint => "complaint",
        ContactCustomerService => "contact_customer_service",
        ContactHumanAgent => "contact_human_agent",
        CreateAccount => "create_account",
        DeleteAccount => "delete_account",
        DeliveryOptions => "delivery_options",
        DeliveryPeriod => "delivery_period",
        EditAccount => "edit_account",
        GetInvoice => "get_invoice",
        GetRefund => "get_refund",
        NewsletterSubscription => "newsletter_subscription",
        PaymentIssue => "payment_issue",
        PlaceOrder => "place_order",
        RecoverPassword => "recover_password",
        RegistrationProblems => "registration_problems",
        Review => "review",
        SetUpShippingAddress => "set_up_shipping_address",
        SwitchAccount => "switch_account",
        TrackOrder => "track_order",
        TrackRefund => "track_refund",
    }
}

impl Intent {
    /// The category this intent belongs to in the Bitext taxonomy.
    pub fn category(self) -> Category {
        use Category as C;
        use Intent as I;
        match self {
            I::CancelOrder | I::ChangeOrder | I::PlaceOrder | I::TrackOrder => C::Order,
            I::ChangeShippingAddress | I::SetUpShippingAddress => C::Shipping,
            I::CheckCancellationFee => C::Cancel,
            I::CheckInvoice | I::GetInvoice => C::Invoice,
            I::CheckPaymentMethods | I::PaymentIssue => C::Payment,
            I::CheckRefundPolicy | I::GetRefund | I::TrackRefund => C::Refund,
            I::Complaint | I::Review => C::Feedback,
            I::ContactCustomerService | I::ContactHumanAgent => C::Contact,
            I::CreateAccount
            | I::DeleteAccount
            | I::EditAccount
            | I::RecoverPassword
            | I::RegistrationProblems
            | I::SwitchAccount => C::Account,
            I::DeliveryOptions | I::DeliveryPeriod => C::Delivery,
            I::NewsletterSubscription => C::Subscription,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_have_the_documented_sizes_and_round_trip() {
        assert_eq!(Category::ALL.len(), 11);
        assert_eq!(Intent::ALL.len(), 27);
        for c in Category::ALL {
            assert_eq!(c.as_str().parse::<Category>().unwrap(), *c);
        }
        for i in Intent::ALL {
            assert_eq!(i.as_str().parse::<Intent>().unwrap(), *i);
        }
        // Every category has at least one intent.
        for c in Category::ALL {
            assert!(Intent::ALL.iter().any(|i| i.category() == *c), "{c}");
        }
    }

    #[test]
    fn unknown_label_lists_the_allowed_ones() {
        let err = "SHOPPING".parse::<Category>().unwrap_err();
        assert!(err.contains("SHIPPING") && err.contains("ACCOUNT"));
    }
}
