"""The features service: streaming features (faust) into Feast's online and offline stores."""
